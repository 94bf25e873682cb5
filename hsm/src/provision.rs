//! Token provisioning for development: find a token by label, or initialise one on a free slot.
//!
//! Runs in the calling process (not a worker) because it happens once, before serving, and needs
//! the Security Officer PIN, which the workers never see.

use std::path::Path;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::session::UserType;
use secrecy::SecretString;

use crate::worker::{describe, find_token};

/// Ensures a token labelled `label` exists in `module`, initialising a free slot with the given
/// PINs if not. Returns whether it created the token. Idempotent: an existing token is left as it is.
pub fn ensure_token(
    module: &Path,
    label: &str,
    so_pin: &SecretString,
    user_pin: &SecretString,
) -> Result<bool, String> {
    let pkcs11 =
        Pkcs11::new(module).map_err(|e| format!("cannot load {}: {e}", module.display()))?;
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(describe)?;
    let mut free = None;
    for slot in pkcs11.get_slots_with_token().map_err(describe)? {
        let info = pkcs11.get_token_info(slot).map_err(describe)?;
        if info.token_initialized() && info.label().trim_end() == label {
            return Ok(false);
        }
        if !info.token_initialized() && free.is_none() {
            free = Some(slot);
        }
    }
    let slot = free.ok_or_else(|| {
        format!(
            "no free slot in {} to initialise token {label:?}",
            module.display()
        )
    })?;
    pkcs11.init_token(slot, so_pin, label).map_err(describe)?;
    // SoftHSM2 moves an initialised token to a new slot id: look it up again by label.
    let (slot, _) = find_token(&pkcs11, label)
        .map_err(describe)?
        .ok_or_else(|| format!("token {label:?} not found after initialisation"))?;
    let session = pkcs11.open_rw_session(slot).map_err(describe)?;
    session
        .login(UserType::So, Some(so_pin))
        .map_err(describe)?;
    session.init_pin(user_pin).map_err(describe)?;
    session.logout().map_err(describe)?;
    Ok(true)
}
