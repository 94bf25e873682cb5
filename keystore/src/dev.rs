//! `hsmkms dev`: a SoftHSM2 token, a configuration and a metadata store under one directory,
//! made once and reused on every later start.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use zeroize::Zeroizing;

use crate::ids::{new_cluster_id, new_custom_key_store_id};
use hsm::WorkerCommand;

pub const DEV_TOKEN_LABEL: &str = "hsmkms-dev";
/// The documented development principal. Only for `hsmkms dev`, which serves on loopback.
pub const DEV_ACCESS_KEY_ID: &str = "AKIAHSMKMSDEV0000001";
pub const DEV_SECRET_ACCESS_KEY: &str = "hsmkms-dev-secret-key-for-local-use-only";

const SOFTHSM_MODULES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

pub fn find_softhsm() -> Result<PathBuf, String> {
    SOFTHSM_MODULES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| {
            "SoftHSM2 is not installed (no libsofthsm2.so found); run softhsm-setup/install.sh"
                .to_string()
        })
}

fn write_private(path: &Path, contents: &[u8]) -> Result<(), String> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(contents)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// A random PIN from the OS RNG (UUID v4 draws from it).
fn random_pin() -> Zeroizing<String> {
    Zeroizing::new(uuid::Uuid::new_v4().simple().to_string())
}

/// Sets up `dir` if needed and returns the path of its configuration file.
/// `worker` provisions the token: it is the program that serves tokens, run as `provision`.
/// Where dev token `n` (1-based) lives: the first in `DIR/tokens` with `DIR/softhsm2.conf`, the
/// others each in `DIR/token-N/`, so that one token can be lost (its directory moved away) while
/// the others serve.
fn token_place(dir: &Path, n: usize) -> (String, PathBuf, PathBuf) {
    if n == 1 {
        (
            DEV_TOKEN_LABEL.to_string(),
            dir.join("tokens"),
            dir.join("softhsm2.conf"),
        )
    } else {
        let home = dir.join(format!("token-{n}"));
        (
            format!("{DEV_TOKEN_LABEL}-{n}"),
            home.join("tokens"),
            home.join("softhsm2.conf"),
        )
    }
}

/// Sets up `dir` if needed and returns the path of its configuration file. `token_count`
/// tokens make a cluster (used only when the directory is new: the configuration is kept).
pub fn prepare(dir: &Path, worker: &WorkerCommand) -> Result<PathBuf, String> {
    prepare_cluster(dir, worker, 1)
}

pub fn prepare_cluster(
    dir: &Path,
    worker: &WorkerCommand,
    token_count: usize,
) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    let dir = dir.canonicalize().map_err(|e| e.to_string())?;
    let module = find_softhsm()?;
    let config = dir.join("hsmkms.toml");
    // An existing configuration decides how many tokens there are.
    let token_count = if config.exists() {
        std::fs::read_to_string(&config)
            .map_err(|e| e.to_string())?
            .matches("[[key_store.tokens]]")
            .count()
            .max(1)
    } else {
        token_count.max(1)
    };
    let places: Vec<_> = (1..=token_count).map(|n| token_place(&dir, n)).collect();
    for (_, tokens, conf) in &places {
        std::fs::create_dir_all(tokens)
            .map_err(|e| format!("cannot create {}: {e}", tokens.display()))?;
        if !conf.exists() {
            let text = format!(
                "# SoftHSM2 configuration of this hsmkms dev directory (not the system-wide one).\n\
                 directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokens.display()
            );
            write_private(conf, text.as_bytes())?;
        }
    }
    let (so_pin_file, user_pin_file) = (dir.join("so.pin"), dir.join("user.pin"));
    let token_exists = places.iter().any(|(_, tokens, _)| {
        std::fs::read_dir(tokens)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    });
    for pin_file in [&so_pin_file, &user_pin_file] {
        if !pin_file.exists() {
            if token_exists {
                // A new PIN would not open the token that the old one initialised.
                return Err(format!(
                    "{} is missing but a dev token in {} exists: restore the file, or remove the directory to start afresh",
                    pin_file.display(),
                    dir.display()
                ));
            }
            write_private(pin_file, random_pin().as_bytes())?;
        }
    }
    // Provision in a worker process: the module reads SOFTHSM2_CONF from its own environment.
    let so_pin = Zeroizing::new(std::fs::read_to_string(&so_pin_file).map_err(|e| e.to_string())?);
    let user_pin =
        Zeroizing::new(std::fs::read_to_string(&user_pin_file).map_err(|e| e.to_string())?);
    // Tokens are made with the store; later a token directory that is missing is a lost token
    // (to be restored), never one to make afresh.
    let new_store = !config.exists();
    for (label, tokens, conf) in places.iter().filter(|_| new_store) {
        let mut child = Command::new(&worker.program)
            .args(&worker.args)
            .args(["provision", &module.to_string_lossy(), label])
            .env("SOFTHSM2_CONF", conf)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the provisioning worker: {e}"))?;
        {
            let mut stdin = child.stdin.take().expect("stdin is piped");
            let input = Zeroizing::new(format!("{}\n{}\n", so_pin.trim(), user_pin.trim()));
            stdin
                .write_all(input.as_bytes())
                .map_err(|e| e.to_string())?;
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "could not initialise the dev token {label} in {}",
                tokens.display()
            ));
        }
        if String::from_utf8_lossy(&out.stdout).trim() == "created" {
            tracing::info!(token = %label, dir = %tokens.display(), "initialised a SoftHSM2 dev token");
        }
    }
    if !config.exists() {
        let text = format!(
            r#"# hsmkms configuration made by `hsmkms dev`; see docs/configuration.md.
listen = "127.0.0.1:8080"
region = "us-east-1"
account = "111122223333"
metadata_path = "{metadata}"
deletion_check_interval_secs = 60

[key_store]
id = "{cks}"
name = "dev"
cluster_id = "{cluster}"

{tokens}
# The documented development principal: for loopback use only. It may also manage key stores.
[[principals]]
name = "dev"
access_key_id = "{akid}"
secret_access_key = "{secret}"
admin = true
"#,
            metadata = dir.join("metadata.db").display(),
            cks = new_custom_key_store_id(),
            cluster = new_cluster_id(),
            tokens = places
                .iter()
                .map(|(label, _, conf)| {
                    // The SO PIN lets the service set up the domain key (clusters, backups).
                    let so = format!("so_pin_file = \"{}\"\n", so_pin_file.display());
                    format!(
                        "[[key_store.tokens]]\nmodule = \"{}\"\nlabel = \"{label}\"\npin_file = \"{}\"\n{so}env = {{ SOFTHSM2_CONF = \"{}\" }}\n",
                        module.display(),
                        user_pin_file.display(),
                        conf.display()
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
            akid = DEV_ACCESS_KEY_ID,
            secret = DEV_SECRET_ACCESS_KEY,
        );
        // Written whole under a temporary name, then renamed: a crash never leaves half a file.
        let tmp = dir.join("hsmkms.toml.tmp");
        let _ = std::fs::remove_file(&tmp);
        write_private(&tmp, text.as_bytes())?;
        std::fs::rename(&tmp, &config).map_err(|e| e.to_string())?;
    }
    // Directories made by older versions had these world-readable (the configuration holds the
    // dev secret): tighten them at every start.
    let private = std::fs::Permissions::from_mode(0o600);
    let metadata = dir.join("metadata.db");
    let wal = dir.join("metadata.db-wal");
    let shm = dir.join("metadata.db-shm");
    let confs = places.iter().map(|(_, _, conf)| conf.as_path());
    for file in confs.chain([config.as_path(), &metadata, &wal, &shm]) {
        if file.exists() {
            std::fs::set_permissions(file, private.clone())
                .map_err(|e| format!("cannot make {} private: {e}", file.display()))?;
        }
    }
    Ok(config)
}
