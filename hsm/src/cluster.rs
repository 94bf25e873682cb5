//! A cluster of tokens that hold the same keys: requests spread over healthy tokens and fail
//! over when one is gone.
//!
//! New keys are generated on one token and carried to the others wrapped by the domain key the
//! tokens share (DESIGN 5).

use std::sync::atomic::{AtomicUsize, Ordering};

use zeroize::Zeroizing;

use crate::error::HsmError;
use crate::pool::TokenPool;
use crate::proto::{KeyIdBytes, MacKeyId, Sealed, TokenInfo};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenHealth {
    Up,
    Down,
}

#[derive(Debug, Clone)]
pub struct TokenStatus {
    pub label: String,
    pub info: TokenInfo,
    pub health: TokenHealth,
    pub worker_restarts: u64,
    pub last_error: Option<String>,
}

pub struct Cluster {
    id: String,
    tokens: Vec<TokenPool>,
    next: AtomicUsize,
    failovers: std::sync::atomic::AtomicU64,
}

impl Cluster {
    pub fn new(id: impl Into<String>, tokens: Vec<TokenPool>) -> Result<Cluster, HsmError> {
        let id = id.into();
        if tokens.is_empty() {
            return Err(HsmError::Other {
                token: id,
                message: "a cluster needs at least one token".into(),
            });
        }
        Ok(Cluster {
            id,
            tokens,
            next: AtomicUsize::new(0),
            failovers: std::sync::atomic::AtomicU64::new(0),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The cluster's tokens.
    pub fn tokens(&self) -> &[TokenPool] {
        &self.tokens
    }

    /// Continues the counters of the cluster this one replaces (same store, tokens changed).
    pub fn continue_counters(self, previous: &Cluster) -> Cluster {
        self.failovers
            .store(previous.failovers(), Ordering::Relaxed);
        self
    }

    /// Requests that moved on to another token after one could not serve.
    pub fn failovers(&self) -> u64 {
        self.failovers.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> Vec<TokenStatus> {
        self.tokens
            .iter()
            .map(|t| TokenStatus {
                label: t.label().to_string(),
                info: t.info(),
                health: if t.is_up() {
                    TokenHealth::Up
                } else {
                    TokenHealth::Down
                },
                worker_restarts: t.restarts(),
                last_error: t.last_error(),
            })
            .collect()
    }

    /// Runs `op` on a healthy token, moving on to the next when one is unavailable.
    async fn any_token<T, F, Fut>(&self, op: F) -> Result<T, HsmError>
    where
        F: Fn(TokenPool) -> Fut,
        Fut: std::future::Future<Output = Result<T, HsmError>>,
    {
        let n = self.tokens.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last = None;
        let mut not_found = None;
        // Healthy tokens first; a token marked down still gets a try if nothing else answers.
        let order = (0..n).map(|i| (start + i) % n);
        let (up, down): (Vec<usize>, Vec<usize>) = order.partition(|&i| self.tokens[i].is_up());
        for i in up.into_iter().chain(down) {
            match op(self.tokens[i].clone()).await {
                // A token that was down when the key was made lacks it until it is caught up:
                // another token of the cluster has it.
                Err(e @ HsmError::KeyNotFound { .. }) if n > 1 => not_found = Some(e),
                Err(e) if e.is_token_fault() => {
                    if n > 1 {
                        self.failovers.fetch_add(1, Ordering::Relaxed);
                    }
                    last = Some(e)
                }
                // A PKCS#11 failure of one token (a key object left damaged by a killed import,
                // SoftHSM2's answers once its directory is gone under a live worker) says nothing
                // of the others: every operation here may be asked again elsewhere.
                Err(e @ HsmError::Pkcs11 { .. }) if n > 1 => {
                    self.failovers.fetch_add(1, Ordering::Relaxed);
                    last = Some(e)
                }
                other => return other,
            }
        }
        // A token that answered "no such key" says more than the tokens that did not answer.
        Err(not_found.or(last).unwrap_or(HsmError::ClusterUnavailable {
            cluster: self.id.clone(),
        }))
    }

    /// Makes a new root key with this id on every token that can serve: generated on one,
    /// carried to the others wrapped by the domain key. Fails, leaving the key nowhere, unless
    /// at least `min_tokens` tokens hold it; tokens that are down get it when they come back.
    pub async fn create_key(&self, key_id: KeyIdBytes, min_tokens: usize) -> Result<(), HsmError> {
        let mut holders: Vec<&TokenPool> = Vec::new();
        let mut last = None;
        let mut wrapped: Option<Vec<u8>> = None;
        let needs_copies = self.tokens.len() > 1;
        let (up, down): (Vec<&TokenPool>, Vec<&TokenPool>) =
            self.tokens.iter().partition(|t| t.is_up());
        for token in up.into_iter().chain(down) {
            let placed = match &wrapped {
                Some(w) => token.import_key(key_id, w.clone()).await,
                None if holders.is_empty() => match token.generate_key(key_id).await {
                    Ok(()) if needs_copies => {
                        holders.push(token);
                        match token.export_key(key_id).await {
                            Ok(w) => {
                                wrapped = Some(w);
                                continue;
                            }
                            Err(e) => Err(e),
                        }
                    }
                    other => other,
                },
                None => unreachable!("a holder exists only once the key is wrapped or alone"),
            };
            match placed {
                Ok(()) => holders.push(token),
                Err(e) if e.is_token_fault() && wrapped.is_some() => last = Some(e),
                Err(e) if e.is_token_fault() && holders.is_empty() => last = Some(e),
                Err(e) => {
                    self.undo(key_id, &holders).await;
                    return Err(e);
                }
            }
        }
        if holders.len() < min_tokens.max(1) {
            self.undo(key_id, &holders).await;
            return Err(last.unwrap_or(HsmError::ClusterUnavailable {
                cluster: self.id.clone(),
            }));
        }
        Ok(())
    }

    async fn undo(&self, key_id: KeyIdBytes, holders: &[&TokenPool]) {
        for token in holders {
            let _ = token.destroy_key(key_id).await;
        }
    }

    /// Whether every token holds the key.
    pub async fn has_key(&self, key_id: KeyIdBytes) -> Result<bool, HsmError> {
        for token in &self.tokens {
            if !token.has_key(key_id).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The key ids on each token, by token label.
    pub async fn list_keys(&self) -> Result<Vec<(String, Vec<KeyIdBytes>)>, HsmError> {
        let mut out = Vec::new();
        for token in &self.tokens {
            out.push((token.label().to_string(), token.list_keys().await?));
        }
        Ok(out)
    }

    /// Destroys the key on every token that can be reached (idempotent). A token that is down
    /// keeps its copy until the prober, seeing the key gone from the metadata, destroys it on
    /// the token's return. Fails only if no token could be reached.
    pub async fn destroy_key(&self, key_id: KeyIdBytes) -> Result<(), HsmError> {
        let mut reached = 0;
        let mut last = None;
        for token in &self.tokens {
            match token.destroy_key(key_id).await {
                Ok(()) => reached += 1,
                Err(e) if e.is_token_fault() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        match (reached, last) {
            (0, Some(e)) => Err(e),
            _ => Ok(()),
        }
    }

    pub async fn encrypt(
        &self,
        key_id: KeyIdBytes,
        aad: Vec<u8>,
        plaintext: Zeroizing<Vec<u8>>,
    ) -> Result<Sealed, HsmError> {
        self.any_token(|t| {
            let (aad, plaintext) = (aad.clone(), plaintext.clone());
            async move { t.encrypt(key_id, aad, plaintext).await }
        })
        .await
    }

    pub async fn decrypt(
        &self,
        key_id: KeyIdBytes,
        aad: Vec<u8>,
        sealed: Sealed,
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        self.any_token(|t| {
            let (aad, sealed) = (aad.clone(), sealed.clone());
            async move { t.decrypt(key_id, aad, sealed).await }
        })
        .await
    }

    pub async fn generate_data_key(
        &self,
        key_id: KeyIdBytes,
        aad: Vec<u8>,
        len: usize,
    ) -> Result<(Zeroizing<Vec<u8>>, Sealed), HsmError> {
        self.any_token(|t| {
            let aad = aad.clone();
            async move { t.generate_data_key(key_id, aad, len).await }
        })
        .await
    }

    /// The domain key's check value, from a token that answers.
    pub async fn domain_kcv(&self) -> Result<Vec<u8>, HsmError> {
        self.any_token(|t| async move { t.domain_kcv().await })
            .await
    }

    /// Copies every backup MAC key that some reachable token holds to the reachable tokens
    /// that lack it, making one first if no reachable token holds any. Returns the ids held
    /// and how many copies were made. Several MAC keys may exist (two processes that made one
    /// at the same moment, a token that was away); each backup names the one that made its
    /// tag, so all are kept, and the lowest id is the one new backups use.
    pub async fn ensure_mac_keys(
        &self,
        may_create: bool,
    ) -> Result<(Vec<MacKeyId>, usize), HsmError> {
        let mut listings = Vec::new();
        let mut last = None;
        for token in self.tokens.iter().filter(|t| t.is_up()) {
            match token.list_mac_keys().await {
                Ok(ids) => listings.push((token, ids)),
                Err(e) if e.is_token_fault() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        if listings.is_empty() {
            return Err(last.unwrap_or(HsmError::ClusterUnavailable {
                cluster: self.id.clone(),
            }));
        }
        let mut all: Vec<MacKeyId> = listings.iter().flat_map(|(_, ids)| ids.clone()).collect();
        all.sort_unstable();
        all.dedup();
        if all.is_empty() && may_create {
            let mut id = [0u8; 8];
            id.copy_from_slice(&listings[0].0.random(8).await?);
            listings[0].0.generate_mac_key(id).await?;
            listings[0].1.push(id);
            all.push(id);
        }
        let mut copies = 0;
        for id in &all {
            let Some((source, _)) = listings.iter().find(|(_, ids)| ids.contains(id)) else {
                continue;
            };
            let mut wrapped = None;
            for (token, _) in listings.iter().filter(|(_, ids)| !ids.contains(id)) {
                let w = match &wrapped {
                    Some(w) => Vec::clone(w),
                    None => wrapped.insert(source.export_mac_key(*id).await?).clone(),
                };
                match token.import_mac_key(*id, w).await {
                    Ok(()) => copies += 1,
                    // A token that went away meanwhile gets the key on its return.
                    Err(e) if e.is_token_fault() => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok((all, copies))
    }

    /// HMAC-SHA256 of `message` under a backup MAC key, made in a token that holds it.
    pub async fn mac(&self, mac_key_id: MacKeyId, message: Vec<u8>) -> Result<Vec<u8>, HsmError> {
        self.any_token(|t| {
            let message = message.clone();
            async move { t.mac(mac_key_id, message).await }
        })
        .await
    }

    /// Whether `mac` is the HMAC-SHA256 of `message` under a backup MAC key, checked in a token
    /// that holds the key; `KeyNotFound` when no token does.
    pub async fn verify_mac(
        &self,
        mac_key_id: MacKeyId,
        message: Vec<u8>,
        mac: Vec<u8>,
    ) -> Result<bool, HsmError> {
        self.any_token(|t| {
            let (message, mac) = (message.clone(), mac.clone());
            async move { t.verify_mac(mac_key_id, message, mac).await }
        })
        .await
    }

    /// The key wrapped by the domain key, from a token that holds it.
    pub async fn export_key(&self, key_id: KeyIdBytes) -> Result<Vec<u8>, HsmError> {
        self.any_token(|t| async move { t.export_key(key_id).await })
            .await
    }

    pub async fn random(&self, len: usize) -> Result<Vec<u8>, HsmError> {
        self.any_token(|t| async move { t.random(len).await }).await
    }
}
