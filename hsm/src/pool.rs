//! A pool of worker processes serving one token.
//!
//! A request goes to the least busy live worker; one writer task per worker numbers each request
//! frame and writes it whole, and one reader task hands each answer to the request whose id it
//! carries (see [`Worker`]). Up to [`PIPELINE_DEPTH`] requests
//! wait in a worker's pipe, so a worker starts its next operation the moment it finishes one
//! instead of idling while the service schedules the next request.
//!
//! A worker that dies (EOF on its pipe) or whose session breaks is replaced, and the request is
//! replayed once where [`Request::retry_is_safe`]. When no replacement can log in, the token is
//! reported unavailable so that a [`crate::Cluster`] can fail over.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use secrecy::SecretString;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{mpsc, oneshot, Mutex, Semaphore};
use zeroize::Zeroizing;

use crate::error::HsmError;
use crate::proto::{
    decode_body, encode_frame, encode_tagged, set_frame_id, split_tagged, DerivedKeyLimits, Hello,
    KeyIdBytes, MacKeyId, Reply, Request, Response, Sealed, TokenInfo, MAX_FRAME, PROTOCOL_VERSION,
};

/// How to start a worker process: a program and its arguments (e.g. `hsmkms worker`).
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

/// One token and how to reach it.
#[derive(Clone)]
pub struct TokenConfig {
    /// The PKCS#11 module (shared library) path.
    pub module: PathBuf,
    /// The token's label (`CKA_LABEL` of the token, as `C_GetTokenInfo` reports it).
    pub label: String,
    /// The user PIN.
    pub pin: SecretString,
    /// Worker processes for this token.
    pub workers: usize,
    /// Extra environment for the workers (e.g. `SOFTHSM2_CONF`).
    pub env: Vec<(String, String)>,
    /// When a worker draws a new derivation nonce; the default keeps the DESIGN 4 bound.
    pub limits: DerivedKeyLimits,
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConfig")
            .field("module", &self.module)
            .field("label", &self.label)
            .field("pin", &"[redacted]")
            .field("workers", &self.workers)
            .finish()
    }
}

/// Don't hammer a token that refuses logins: after a failed start, wait this long before trying again.
const RESPAWN_BACKOFF: Duration = Duration::from_millis(500);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest a token operation may take before its worker is deemed hung and replaced.
pub const OPERATION_DEADLINE: Duration = Duration::from_secs(15);
/// Tries to start a replacement worker before the token counts as down.
const SPAWN_ATTEMPTS: u32 = 3;
/// Requests in flight per worker: one executing, the rest waiting in its pipe.
pub const PIPELINE_DEPTH: usize = 2;

struct Shared {
    config: TokenConfig,
    command: WorkerCommand,
    /// What the token says of itself, as its latest worker read it.
    info: StdMutex<TokenInfo>,
    up: AtomicBool,
    restarts: AtomicU64,
    last_spawn_failure: StdMutex<Option<(Instant, HsmError)>>,
    /// [`TokenPool::operation_deadline`], in milliseconds.
    deadline_ms: AtomicU64,
    slots: Vec<Slot>,
    /// Workers of one token start one at a time.
    spawning: Mutex<()>,
    /// Bounds the requests in flight to `workers * PIPELINE_DEPTH`; fair, so callers are served in order.
    in_flight: Semaphore,
}

/// One worker's place in the pool.
struct Slot {
    current: StdMutex<Option<Arc<Worker>>>,
    /// Held while a replacement starts, so that one death leads to one respawn.
    respawning: Mutex<()>,
    /// A background refill of this slot is under way.
    refilling: AtomicBool,
}

/// The workers of one token. Cheap to clone; the workers stop when the last clone is dropped.
#[derive(Clone)]
pub struct TokenPool {
    shared: Arc<Shared>,
}

impl TokenPool {
    /// Starts the pool; fails if the first worker cannot load the module, find the token or log in.
    /// The other workers start on first use.
    pub async fn start(config: TokenConfig, command: WorkerCommand) -> Result<TokenPool, HsmError> {
        let first = Worker::spawn(&config, &command).await?;
        let pool = TokenPool::assemble(config, command, Some(first));
        // Start the rest now rather than on the first requests' latency.
        for i in 1..pool.shared.slots.len() {
            pool.worker(i).await?;
        }
        Ok(pool)
    }

    /// Like [`TokenPool::start`], but a token that cannot be reached now (its workers fail to
    /// start: the token is gone, not refused) gives a pool marked down instead of an error; it
    /// comes up when a later request or probe finds the token back. For the tokens of a
    /// cluster, where the others serve meanwhile.
    pub async fn start_or_down(
        config: TokenConfig,
        command: WorkerCommand,
    ) -> Result<TokenPool, HsmError> {
        match TokenPool::start(config.clone(), command.clone()).await {
            Ok(pool) => Ok(pool),
            Err(e @ HsmError::TokenUnavailable { .. }) if !e.is_pin_failure() => {
                tracing::warn!(token = %config.label, error = %e, "token unreachable at start; serving without it");
                let pool = TokenPool::assemble(config, command, None);
                pool.shared.up.store(false, Ordering::Relaxed);
                *pool.shared.last_spawn_failure.lock().unwrap() = Some((Instant::now(), e.clone()));
                Ok(pool)
            }
            Err(e) => Err(e),
        }
    }

    fn assemble(
        config: TokenConfig,
        command: WorkerCommand,
        first: Option<Arc<Worker>>,
    ) -> TokenPool {
        let workers = config.workers.max(1);
        let info = first
            .as_ref()
            .map(|w| w.info.clone())
            .unwrap_or_else(|| TokenInfo {
                label: config.label.clone(),
                manufacturer: String::new(),
                model: String::new(),
                serial: String::new(),
            });
        let mut first = first;
        let slots = (0..workers)
            .map(|_| Slot {
                current: StdMutex::new(first.take()),
                respawning: Mutex::new(()),
                refilling: AtomicBool::new(false),
            })
            .collect();
        TokenPool {
            shared: Arc::new(Shared {
                info: StdMutex::new(info),
                config,
                command,
                up: AtomicBool::new(true),
                restarts: AtomicU64::new(0),
                last_spawn_failure: StdMutex::new(None),
                deadline_ms: AtomicU64::new(OPERATION_DEADLINE.as_millis() as u64),
                slots,
                spawning: Mutex::new(()),
                in_flight: Semaphore::new(workers * PIPELINE_DEPTH),
            }),
        }
    }

    pub fn label(&self) -> &str {
        &self.shared.config.label
    }

    pub fn info(&self) -> TokenInfo {
        self.shared.info.lock().unwrap().clone()
    }

    /// False after a worker could not be restarted; true again once one is.
    pub fn is_up(&self) -> bool {
        self.shared.up.load(Ordering::Relaxed)
    }

    /// Worker processes replaced since start.
    pub fn restarts(&self) -> u64 {
        self.shared.restarts.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.shared
            .last_spawn_failure
            .lock()
            .unwrap()
            .as_ref()
            .map(|(_, e)| e.to_string())
    }

    /// The live worker with the fewest requests in flight, and a slot without a live worker.
    fn pick(&self) -> (Option<usize>, Option<usize>) {
        let mut best: Option<(usize, usize)> = None;
        let mut dead = None;
        for (i, slot) in self.shared.slots.iter().enumerate() {
            match slot.current.lock().unwrap().as_ref() {
                Some(w) if w.is_alive() => {
                    let load = w.in_flight.load(Ordering::Relaxed);
                    if best.is_none_or(|(_, b)| load < b) {
                        best = Some((i, load));
                    }
                }
                _ => {
                    dead.get_or_insert(i);
                }
            }
        }
        (best.map(|(i, _)| i), dead)
    }

    /// A live worker for the next request. A dead slot is refilled in the background while
    /// others serve; only when none is alive does the request wait for a new worker.
    async fn acquire(&self) -> Result<(usize, Arc<Worker>), HsmError> {
        let (live, dead) = self.pick();
        if let (Some(_), Some(d)) = (live, dead) {
            let slot = &self.shared.slots[d];
            if !slot.refilling.swap(true, Ordering::AcqRel) {
                let pool = self.clone();
                tokio::spawn(async move {
                    let _ = pool.worker(d).await;
                    pool.shared.slots[d]
                        .refilling
                        .store(false, Ordering::Release);
                });
            }
        }
        let i = live.or(dead).unwrap_or(0);
        let live_worker = self.shared.slots[i]
            .current
            .lock()
            .unwrap()
            .clone()
            .filter(|w| w.is_alive());
        match live_worker {
            Some(w) => Ok((i, w)),
            None => Ok((i, self.worker(i).await?)),
        }
    }

    /// A live worker in a slot other than `not` (started if need be).
    async fn acquire_other(&self, not: usize) -> Result<(usize, Arc<Worker>), HsmError> {
        let n = self.shared.slots.len();
        let live = (1..n).map(|d| (not + d) % n).find(|&i| {
            self.shared.slots[i]
                .current
                .lock()
                .unwrap()
                .as_ref()
                .is_some_and(|w| w.is_alive())
        });
        let i = live.unwrap_or((not + 1) % n);
        Ok((i, self.worker(i).await?))
    }

    /// The live worker of slot `i`, starting one if it has none.
    async fn worker(&self, i: usize) -> Result<Arc<Worker>, HsmError> {
        let slot = &self.shared.slots[i];
        if let Some(w) = slot
            .current
            .lock()
            .unwrap()
            .as_ref()
            .filter(|w| w.is_alive())
        {
            return Ok(w.clone());
        }
        let _guard = slot.respawning.lock().await;
        if let Some(w) = slot
            .current
            .lock()
            .unwrap()
            .as_ref()
            .filter(|w| w.is_alive())
        {
            return Ok(w.clone());
        }
        // Only a worker that replaces one counts as a restart, not a slot's first.
        let replacing = slot.current.lock().unwrap().is_some();
        let worker = self.respawn(replacing).await?;
        *slot.current.lock().unwrap() = Some(worker.clone());
        Ok(worker)
    }

    /// Starts one worker, one at a time per token, trying a few times: a token file that another
    /// process is rewriting (SoftHSM2 updates it at login) makes a concurrent C_GetTokenInfo or
    /// C_Login fail with CKR_GENERAL_ERROR for a moment.
    async fn spawn_with_retries(&self) -> Result<Arc<Worker>, HsmError> {
        let _one_at_a_time = self.shared.spawning.lock().await;
        let mut delay = Duration::from_millis(20);
        let mut attempt = 1;
        loop {
            match Worker::spawn(&self.shared.config, &self.shared.command).await {
                Ok(w) => return Ok(w),
                // Never retry a refused PIN: HSMs lock the user out after a few wrong tries.
                Err(e) if attempt < SPAWN_ATTEMPTS && !e.is_pin_failure() => {
                    tracing::debug!(token = %self.label(), error = %e, attempt, "worker start failed; trying again");
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn respawn(&self, replacing: bool) -> Result<Arc<Worker>, HsmError> {
        let shared = &self.shared;
        let token = shared.config.label.clone();
        if let Some((at, error)) = shared.last_spawn_failure.lock().unwrap().clone() {
            if at.elapsed() < RESPAWN_BACKOFF && !shared.up.load(Ordering::Relaxed) {
                return Err(error);
            }
        }
        match self.spawn_with_retries().await {
            Ok(w) => {
                if replacing {
                    shared.restarts.fetch_add(1, Ordering::Relaxed);
                }
                *shared.info.lock().unwrap() = w.info.clone();
                if !shared.up.swap(true, Ordering::Relaxed) {
                    tracing::info!(token = %token, "token is back");
                }
                *shared.last_spawn_failure.lock().unwrap() = None;
                Ok(w)
            }
            Err(e) => {
                if shared.up.swap(false, Ordering::Relaxed) {
                    tracing::error!(token = %token, error = %e, "token is down");
                }
                let e = e.into_unavailable(&token);
                *shared.last_spawn_failure.lock().unwrap() = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    /// How long a request may take before its worker is deemed hung (default
    /// [`OPERATION_DEADLINE`]).
    pub fn operation_deadline(&self) -> Duration {
        Duration::from_millis(self.shared.deadline_ms.load(Ordering::Relaxed))
    }

    /// Changes the deadline of every later request (tests shorten it to see a hung worker go).
    pub fn set_operation_deadline(&self, deadline: Duration) {
        let ms = u64::try_from(deadline.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.shared.deadline_ms.store(ms, Ordering::Relaxed);
    }

    async fn permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, HsmError> {
        self.shared
            .in_flight
            .acquire()
            .await
            .map_err(|_| HsmError::unavailable(self.label(), "worker pool stopped"))
    }

    fn encode(&self, request: &Request) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        encode_tagged(0, request).map_err(|e| HsmError::Other {
            token: self.label().to_string(),
            message: e.to_string(),
        })
    }

    /// One request to one worker within the deadline. A worker that does not answer in time is
    /// hung (or its token is) and cannot be trusted with the next request either: it is killed,
    /// and its slot refilled on next use.
    async fn ask(&self, worker: &Worker, request: &Request) -> Result<Response, HsmError> {
        let frame = self.encode(request)?;
        let deadline = self.operation_deadline();
        let io = match tokio::time::timeout(deadline, worker.call(frame)).await {
            Ok(Ok(response)) => return Ok(response),
            Ok(Err(io)) => io,
            Err(_) => std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {} ms", deadline.as_millis()),
            ),
        };
        tracing::warn!(token = %self.label(), op = request.name(), error = %io, "worker died or hung; replacing it");
        worker.kill();
        Err(HsmError::unavailable(
            self.label(),
            format!("worker died: {io}"),
        ))
    }

    pub async fn call(&self, request: Request) -> Result<Reply, HsmError> {
        let token = self.label();
        let _permit = self.permit().await?;
        let attempts = if request.retry_is_safe() { 2 } else { 1 };
        let mut last_error = None;
        let mut failed_slot = None;
        // "No such key" from one worker may be its stale view of the token (SoftHSM2's
        // per-process object index; see the worker's `needs_fresh_view`): ask another once.
        let mut ask_another: Option<usize> = None;
        let mut attempt = 0;
        while attempt < attempts {
            // A replay goes to the replacement of the worker that failed, not to another worker
            // that may have died in the same instant (all of a token's workers die together when
            // the token goes away).
            let (slot, worker) = match (failed_slot, ask_another.take()) {
                (Some(i), _) => (i, self.worker(i).await?),
                (None, Some(not)) => self.acquire_other(not).await?,
                (None, None) => self.acquire().await?,
            };
            let answer = self.ask(&worker, &request).await;
            attempt += 1;
            match answer {
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(failure)) => {
                    let broken = failure.kind == crate::proto::FailureKind::SessionBroken;
                    let not_found = failure.kind == crate::proto::FailureKind::KeyNotFound;
                    let error = HsmError::from_failure(token, failure);
                    if not_found && last_error.is_none() && self.shared.slots.len() > 1 {
                        ask_another = Some(slot);
                        last_error = Some(error);
                        continue;
                    }
                    if !broken {
                        return Err(error);
                    }
                    tracing::warn!(token = %token, op = request.name(), error = %error, "session broken; replacing worker");
                    worker.kill();
                    failed_slot = Some(slot);
                    last_error = Some(error);
                }
                // `ask` killed the worker.
                Err(e @ HsmError::TokenUnavailable { .. }) => {
                    failed_slot = Some(slot);
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        // The second opinion on a missing key is asked even when no replay is allowed; through
        // `ask`, so a worker that hangs on it is replaced like any other.
        if let Some(not) = ask_another {
            let (_, worker) = self.acquire_other(not).await?;
            if let Ok(Ok(reply)) = self.ask(&worker, &request).await {
                return Ok(reply);
            }
        }
        Err(last_error.expect("at least one attempt was made"))
    }

    fn unexpected(&self, reply: Reply) -> HsmError {
        HsmError::Other {
            token: self.label().to_string(),
            message: format!("unexpected reply {reply:?}"),
        }
    }

    pub async fn generate_key(&self, key_id: KeyIdBytes) -> Result<(), HsmError> {
        match self.call(Request::GenerateKey { key_id }).await? {
            Reply::Done => Ok(()),
            other => Err(self.unexpected(other)),
        }
    }

    pub async fn has_key(&self, key_id: KeyIdBytes) -> Result<bool, HsmError> {
        match self.call(Request::HasKey { key_id }).await? {
            Reply::Exists(b) => Ok(b),
            other => Err(self.unexpected(other)),
        }
    }

    /// The domain key's check value (8 bytes).
    pub async fn domain_kcv(&self) -> Result<Vec<u8>, HsmError> {
        match self.call(Request::DomainKcv).await? {
            Reply::Wrapped(w) => Ok(w),
            other => Err(self.unexpected(other)),
        }
    }

    pub async fn generate_mac_key(&self, mac_key_id: MacKeyId) -> Result<(), HsmError> {
        match self.call(Request::GenerateMacKey { mac_key_id }).await? {
            Reply::Done => Ok(()),
            other => Err(self.unexpected(other)),
        }
    }

    pub async fn list_mac_keys(&self) -> Result<Vec<MacKeyId>, HsmError> {
        match self.call(Request::ListMacKeys).await? {
            Reply::MacKeyIds(ids) => Ok(ids),
            other => Err(self.unexpected(other)),
        }
    }

    pub async fn export_mac_key(&self, mac_key_id: MacKeyId) -> Result<Vec<u8>, HsmError> {
        match self.call(Request::ExportMacKey { mac_key_id }).await? {
            Reply::Wrapped(w) => Ok(w),
            other => Err(self.unexpected(other)),
        }
    }

    pub async fn import_mac_key(
        &self,
        mac_key_id: MacKeyId,
        wrapped: Vec<u8>,
    ) -> Result<(), HsmError> {
        match self
            .call(Request::ImportMacKey {
                mac_key_id,
                wrapped,
            })
            .await?
        {
            Reply::Done => Ok(()),
            other => Err(self.unexpected(other)),
        }
    }

    pub async fn mac(&self, mac_key_id: MacKeyId, message: Vec<u8>) -> Result<Vec<u8>, HsmError> {
        match self
            .call(Request::Mac {
                mac_key_id,
                message,
            })
            .await?
        {
            Reply::Mac(m) => Ok(m),
            other => Err(self.unexpected(other)),
        }
    }

    pub async fn verify_mac(
        &self,
        mac_key_id: MacKeyId,
        message: Vec<u8>,
        mac: Vec<u8>,
    ) -> Result<bool, HsmError> {
        match self
            .call(Request::VerifyMac {
                mac_key_id,
                message,
                mac,
            })
            .await?
        {
            Reply::Verified(ok) => Ok(ok),
            other => Err(self.unexpected(other)),
        }
    }

    pub async fn export_key(&self, key_id: KeyIdBytes) -> Result<Vec<u8>, HsmError> {
        match self.call(Request::ExportKey { key_id }).await? {
            Reply::Wrapped(w) => Ok(w),
            other => Err(self.unexpected(other)),
        }
    }

    pub async fn import_key(&self, key_id: KeyIdBytes, wrapped: Vec<u8>) -> Result<(), HsmError> {
        match self.call(Request::ImportKey { key_id, wrapped }).await? {
            Reply::Done => Ok(()),
            other => Err(self.unexpected(other)),
        }
    }

    pub async fn list_keys(&self) -> Result<Vec<KeyIdBytes>, HsmError> {
        match self.call(Request::ListKeys).await? {
            Reply::KeyIds(ids) => Ok(ids),
            other => Err(self.unexpected(other)),
        }
    }

    /// Destroys the key on the token, then makes every other live worker drop what it cached
    /// of it (handles, derived keys): nothing of a destroyed key stays usable in any session.
    pub async fn destroy_key(&self, key_id: KeyIdBytes) -> Result<(), HsmError> {
        match self.call(Request::DestroyKey { key_id }).await? {
            Reply::Done => {}
            other => return Err(self.unexpected(other)),
        }
        let live: Vec<Arc<Worker>> = self
            .shared
            .slots
            .iter()
            .filter_map(|s| s.current.lock().unwrap().clone())
            .filter(|w| w.is_alive())
            .collect();
        let forget = Request::Forget { key_id };
        for worker in live {
            // Under the same bounds as any request: a worker that does not answer within the
            // deadline is killed, and takes its cache with it; so does one that dies meanwhile.
            let _permit = self.permit().await?;
            let _ = self.ask(&worker, &forget).await;
        }
        Ok(())
    }

    pub async fn encrypt(
        &self,
        key_id: KeyIdBytes,
        aad: Vec<u8>,
        plaintext: Zeroizing<Vec<u8>>,
    ) -> Result<Sealed, HsmError> {
        match self
            .call(Request::Encrypt {
                key_id,
                aad,
                plaintext,
            })
            .await?
        {
            Reply::Sealed(s) => Ok(s),
            other => Err(self.unexpected(other)),
        }
    }

    pub async fn decrypt(
        &self,
        key_id: KeyIdBytes,
        aad: Vec<u8>,
        sealed: Sealed,
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        match self
            .call(Request::Decrypt {
                key_id,
                aad,
                sealed,
            })
            .await?
        {
            Reply::Plaintext(p) => Ok(p),
            other => Err(self.unexpected(other)),
        }
    }

    pub async fn generate_data_key(
        &self,
        key_id: KeyIdBytes,
        aad: Vec<u8>,
        len: usize,
    ) -> Result<(Zeroizing<Vec<u8>>, Sealed), HsmError> {
        match self
            .call(Request::GenerateDataKey { key_id, aad, len })
            .await?
        {
            Reply::DataKey { plaintext, sealed } => Ok((plaintext, sealed)),
            other => Err(self.unexpected(other)),
        }
    }

    pub async fn random(&self, len: usize) -> Result<Vec<u8>, HsmError> {
        match self.call(Request::Random { len }).await? {
            Reply::Random(r) => Ok(r),
            other => Err(self.unexpected(other)),
        }
    }

    pub async fn ping(&self) -> Result<(), HsmError> {
        match self.call(Request::Ping).await? {
            Reply::Done => Ok(()),
            other => Err(self.unexpected(other)),
        }
    }
}

type Waiter = oneshot::Sender<std::io::Result<Response>>;

/// Requests written to a worker and not yet answered, in the order written; `closed` once the
/// reader has stopped. Only the writer task adds and only the reader task removes.
#[derive(Default)]
struct Waiters {
    queue: VecDeque<(u64, Waiter)>,
    closed: bool,
}

/// A whole request frame on its way to the writer task, and where its answer goes.
struct Outgoing {
    frame: Zeroizing<Vec<u8>>,
    reply: Waiter,
}

/// A running worker process. Its stdin belongs to one writer task, which gives each frame its
/// request id and writes it whole: a caller that is cancelled can drop its request only before
/// the writer has taken it (then nothing is written and nobody waits), never halfway through a
/// frame. Its stdout belongs to one reader task, which accepts only the reply to the oldest
/// written request, by id: the worker answers in order, so any other frame means the pipe is
/// broken, and the worker is killed rather than believed.
struct Worker {
    info: TokenInfo,
    child: Arc<StdMutex<Child>>,
    outgoing: mpsc::Sender<Outgoing>,
    alive: Arc<AtomicBool>,
    in_flight: AtomicUsize,
}

impl Worker {
    async fn spawn(config: &TokenConfig, command: &WorkerCommand) -> Result<Arc<Worker>, HsmError> {
        let token = config.label.clone();
        let down = |reason: String| HsmError::unavailable(&token, reason);
        let mut cmd = Command::new(&command.program);
        cmd.args(&command.args)
            .envs(config.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            down(format!(
                "cannot start worker {}: {e}",
                command.program.display()
            ))
        })?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let hello = Hello {
            version: PROTOCOL_VERSION,
            module: config.module.to_string_lossy().into_owned(),
            token_label: config.label.clone(),
            limits: config.limits,
            pin: config.pin.clone(),
        };
        let frame = encode_frame(&hello).map_err(|e| down(e.to_string()))?;
        let handshake = async {
            stdin.write_all(&frame).await?;
            decode_body::<Response>(&read_body(&mut stdout).await?)
        };
        let info = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(Ok(Reply::Ready(info)))) => info,
            Ok(Ok(Ok(other))) => return Err(down(format!("unexpected handshake reply {other:?}"))),
            Ok(Ok(Err(failure))) => return Err(HsmError::from_failure(&token, failure)),
            Ok(Err(io)) => return Err(down(format!("worker exited during start: {io}"))),
            Err(_) => return Err(down("worker did not answer within 30 s".into())),
        };
        let waiters: Arc<StdMutex<Waiters>> = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let child = Arc::new(StdMutex::new(child));
        // Room for every request the pool lets in: a send never waits in practice.
        let (outgoing, requests) = mpsc::channel(4 * PIPELINE_DEPTH);
        tokio::spawn(write_requests(
            stdin,
            requests,
            waiters.clone(),
            alive.clone(),
            child.clone(),
        ));
        tokio::spawn(read_answers(stdout, waiters, alive.clone(), child.clone()));
        Ok(Arc::new(Worker {
            info,
            child,
            outgoing,
            alive,
            in_flight: AtomicUsize::new(0),
        }))
    }

    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    /// Hands one whole request frame (made by [`encode_tagged`]) to the writer and waits for its
    /// answer. Safe to drop at any point: before the writer takes the frame, nothing is sent;
    /// after, the reader discards the answer by its id.
    async fn call(&self, frame: Zeroizing<Vec<u8>>) -> std::io::Result<Response> {
        let exited = || std::io::Error::new(std::io::ErrorKind::BrokenPipe, "worker exited");
        let (reply, answer) = oneshot::channel();
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let _done = InFlight(&self.in_flight);
        self.outgoing
            .send(Outgoing { frame, reply })
            .await
            .map_err(|_| exited())?;
        answer.await.unwrap_or_else(|_| Err(exited()))
    }

    fn kill(&self) {
        kill(&self.alive, &self.child);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn kill(alive: &AtomicBool, child: &StdMutex<Child>) {
    alive.store(false, Ordering::Relaxed);
    let _ = child.lock().unwrap().start_kill();
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The one writer of a worker's stdin: numbers each frame and writes it whole. Ends when the
/// worker goes (its callers then see the pipe closed) or its pipe breaks.
async fn write_requests(
    mut stdin: ChildStdin,
    mut requests: mpsc::Receiver<Outgoing>,
    waiters: Arc<StdMutex<Waiters>>,
    alive: Arc<AtomicBool>,
    child: Arc<StdMutex<Child>>,
) {
    let mut next_id: u64 = 1;
    while let Some(Outgoing { mut frame, reply }) = requests.recv().await {
        // The caller gave up before its frame left: send nothing, so nothing is owed to it.
        if reply.is_closed() {
            continue;
        }
        let id = next_id;
        next_id += 1;
        set_frame_id(&mut frame, id);
        {
            let mut waiters = waiters.lock().unwrap();
            if waiters.closed {
                return;
            }
            // Queued before the write, so the answer always finds its waiter.
            waiters.queue.push_back((id, reply));
        }
        if stdin.write_all(&frame).await.is_err() {
            // The reader sees the end of the pipe and fails whoever waits.
            kill(&alive, &child);
            return;
        }
    }
}

/// The one reader of a worker's stdout: hands each answer to the request it answers. Any frame
/// that is not the answer to the oldest outstanding request (another id, an id never given or
/// already answered, an undecodable or overlong body) ends the worker, failing every waiter.
async fn read_answers(
    mut stdout: BufReader<ChildStdout>,
    waiters: Arc<StdMutex<Waiters>>,
    alive: Arc<AtomicBool>,
    child: Arc<StdMutex<Child>>,
) {
    let broken = loop {
        let body = match read_body(&mut stdout).await {
            Ok(body) => body,
            Err(e) => break e,
        };
        let (id, rest) = match split_tagged(&body) {
            Ok(tagged) => tagged,
            Err(e) => break e,
        };
        let waiter = {
            let mut waiters = waiters.lock().unwrap();
            match waiters.queue.front() {
                Some((expected, _)) if *expected == id => waiters.queue.pop_front(),
                _ => None,
            }
        };
        let Some((_, waiter)) = waiter else {
            break std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("reply for request {id}, which is not the oldest awaiting an answer"),
            );
        };
        match decode_body::<Response>(rest) {
            // A caller that gave up meanwhile is gone: its answer is dropped here.
            Ok(answer) => {
                let _ = waiter.send(Ok(answer));
            }
            Err(e) => {
                let _ = waiter.send(Err(std::io::Error::new(e.kind(), e.to_string())));
                break e;
            }
        }
    };
    if broken.kind() != std::io::ErrorKind::UnexpectedEof {
        tracing::error!(error = %broken, "corrupt frame from a worker; replacing it");
    }
    kill(&alive, &child);
    let left: Vec<(u64, Waiter)> = {
        let mut waiters = waiters.lock().unwrap();
        waiters.closed = true;
        waiters.queue.drain(..).collect()
    };
    for (_, w) in left {
        let _ = w.send(Err(std::io::Error::new(broken.kind(), broken.to_string())));
    }
}

/// One frame's body, its length checked against [`MAX_FRAME`] before anything is allocated.
async fn read_body(stdout: &mut BufReader<ChildStdout>) -> std::io::Result<Zeroizing<Vec<u8>>> {
    let len = stdout.read_u32_le().await? as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "frame too large",
        ));
    }
    let mut body = Zeroizing::new(vec![0u8; len]);
    stdout.read_exact(&mut body).await?;
    Ok(body)
}
