//! The `hsmkms` command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

// Each request allocates many small buffers (headers, JSON, frames); mimalloc serves them with
// less work and contention than glibc's allocator (measured: see docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use keystore::config::Config;

/// hsmkms: an AWS KMS-compatible key management service whose root keys never leave PKCS#11 tokens.
#[derive(Parser)]
#[command(name = "hsmkms", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the KMS JSON API with the tokens and metadata store named in a configuration file.
    Serve {
        /// The configuration file (TOML); see docs/configuration.md.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Override the configuration's listen address, e.g. 127.0.0.1:0 for any free port.
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
    },
    /// Set up (once) and serve a development store: a SoftHSM2 token, a configuration and a
    /// metadata store under DIR, with the documented dev principal, on loopback.
    Dev {
        /// Directory for the dev token, PIN files, configuration and metadata.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Address to listen on; 127.0.0.1:0 picks a free port and prints it.
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// Make the dev store a cluster of this many SoftHSM2 tokens sharing a domain key (only
        /// when DIR is new; an existing configuration keeps its tokens).
        #[arg(long, default_value_t = 1, value_name = "N")]
        tokens: usize,
        /// PEM certificate chain for the KMS front (HTTPS); with --tls-key.
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key for the KMS front.
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Also serve TDE keys (Vault KV v2, mount "tde") on this address, e.g. 127.0.0.1:8200.
        #[arg(long, value_name = "ADDR")]
        tde_listen: Option<SocketAddr>,
        /// PEM certificate chain for the TDE listener (HTTPS); with --tde-tls-key.
        #[arg(long, value_name = "FILE", requires_all = ["tde_listen", "tde_tls_key"])]
        tde_tls_cert: Option<PathBuf>,
        /// PEM private key for the TDE listener.
        #[arg(long, value_name = "FILE", requires_all = ["tde_listen", "tde_tls_cert"])]
        tde_tls_key: Option<PathBuf>,
    },
    /// Manage keys without going through the HTTP API.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Manage TDE keys for databases (served over the Vault KV v2 API): clients and their
    /// tokens, keys and their versions. Safe to run while the service is serving.
    Tde {
        #[command(subcommand)]
        command: TdeCommand,
    },
    /// Back up keys (wrapped by the domain key, never in the clear) and their metadata to one
    /// file; verify a backup; restore one (idempotent). See docs/backup.md.
    Backup {
        #[command(subcommand)]
        command: BackupCommand,
    },
    /// Manage custom key stores (token clusters) of the running service: create, list, connect,
    /// disconnect, add or remove a token, delete. See docs/clusters.md.
    Store {
        #[command(flatten)]
        target: ServiceTarget,
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// A token worker process (started by the service; not for use by hand).
    #[command(hide = true)]
    Worker {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct Target {
    /// The configuration file of the service.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The directory of a `hsmkms dev` store.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

/// How to reach the running service: its configuration or dev directory (for its endpoint and
/// an admin principal), or an endpoint with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
#[derive(Args)]
struct ServiceTarget {
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    #[arg(long, value_name = "DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// The KMS endpoint, e.g. http://127.0.0.1:8080 or https://kms.example:8443.
    #[arg(long, value_name = "URL", global = true)]
    endpoint: Option<String>,
    /// For an https endpoint: the PEM file of the CA that signed its certificate (default:
    /// $AWS_CA_BUNDLE).
    #[arg(long, value_name = "FILE", global = true)]
    ca_file: Option<PathBuf>,
}

/// A token: `label=L,module=/path/lib.so,pin-file=/path[,so-pin-file=/path][,workers=N][,env.NAME=VALUE]`.
const TOKEN_HELP: &str =
    "label=L,module=/path/lib.so,pin-file=FILE[,so-pin-file=FILE][,workers=N][,env.NAME=VALUE]";

#[derive(Subcommand)]
enum StoreCommand {
    /// The key stores with their connection state and tokens (DescribeCustomKeyStores).
    List,
    /// Create a key store of two or more tokens (one with --dev), then connect it unless
    /// --no-connect. Prints its id.
    Create {
        #[arg(long)]
        name: String,
        /// A token of the store; give it once per token.
        #[arg(long = "token", value_name = "SPEC", help = TOKEN_HELP, required = true)]
        tokens: Vec<String>,
        /// CreateKey succeeds once a key is on this many tokens.
        #[arg(long, value_name = "N")]
        min_tokens: Option<usize>,
        /// A development store, which may have a single token.
        #[arg(long)]
        dev: bool,
        #[arg(long)]
        no_connect: bool,
    },
    /// Add a token to a store. On a connected store the token gets the domain key and every
    /// key before it serves; no restart.
    AddToken {
        #[arg(value_name = "STORE_ID")]
        store: String,
        #[arg(long = "token", value_name = "SPEC", help = TOKEN_HELP)]
        token: String,
    },
    /// Remove a token from a store, once the other tokens hold every key.
    RemoveToken {
        #[arg(value_name = "STORE_ID")]
        store: String,
        /// The token's label.
        #[arg(value_name = "LABEL")]
        label: String,
    },
    /// Rename a store or change its minimum number of tokens per key.
    Update {
        #[arg(value_name = "STORE_ID")]
        store: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, value_name = "N")]
        min_tokens: Option<usize>,
    },
    /// Connect a store and wait until it serves.
    Connect {
        #[arg(value_name = "STORE_ID")]
        store: String,
    },
    /// Disconnect a store: its keys are unavailable until it is connected again.
    Disconnect {
        #[arg(value_name = "STORE_ID")]
        store: String,
    },
    /// Delete a disconnected store that holds no keys.
    Delete {
        #[arg(value_name = "STORE_ID")]
        store: String,
    },
}

/// UpdateCustomKeyStore with `change`, then the store as it is afterwards.
async fn update(
    kms: &mut keystore::client::KmsClient,
    store: &str,
    mut change: serde_json::Value,
) -> Result<serde_json::Value, String> {
    use keystore::store_cli::{by_id, call};
    change["CustomKeyStoreId"] = serde_json::json!(store);
    call(kms, "UpdateCustomKeyStore", change).await?;
    let mut described = call(kms, "DescribeCustomKeyStores", by_id(store)).await?;
    Ok(described["CustomKeyStores"][0].take())
}

fn run_store(target: ServiceTarget, command: StoreCommand) -> Result<(), String> {
    use keystore::store_cli::{by_id, call, client, parse_token, wait_connected};
    use serde_json::json;
    let config = match (&target.config, &target.data_dir) {
        (None, None) => None,
        _ => Some(load(&Target {
            config: target.config.clone(),
            data_dir: target.data_dir.clone(),
        })?),
    };
    let mut kms = client(
        config.as_ref(),
        target.endpoint.as_deref(),
        target.ca_file.as_deref(),
    )?;
    let wait = std::time::Duration::from_secs(120);
    runtime().block_on(async move {
        let out = match command {
            StoreCommand::List => call(&mut kms, "DescribeCustomKeyStores", json!({})).await?,
            StoreCommand::Create {
                name,
                tokens,
                min_tokens,
                dev,
                no_connect,
            } => {
                let tokens = tokens
                    .iter()
                    .map(|t| parse_token(t))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut body = json!({
                    "CustomKeyStoreName": name,
                    "CustomKeyStoreType": keystore::key_stores::STORE_TYPE,
                    "HsmkmsTokens": tokens,
                    "HsmkmsDevStore": dev,
                });
                if let Some(m) = min_tokens {
                    body["HsmkmsMinTokens"] = json!(m);
                }
                let created = call(&mut kms, "CreateCustomKeyStore", body).await?;
                let id = created["CustomKeyStoreId"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if no_connect {
                    created
                } else {
                    call(
                        &mut kms,
                        "ConnectCustomKeyStore",
                        json!({ "CustomKeyStoreId": id }),
                    )
                    .await?;
                    wait_connected(&mut kms, &id, wait).await?
                }
            }
            StoreCommand::AddToken { store, token } => {
                let token = parse_token(&token)?;
                update(&mut kms, &store, json!({ "HsmkmsAddTokens": [token] })).await?
            }
            StoreCommand::RemoveToken { store, label } => {
                update(&mut kms, &store, json!({ "HsmkmsRemoveTokens": [label] })).await?
            }
            StoreCommand::Update {
                store,
                name,
                min_tokens,
            } => {
                let mut change = json!({});
                if let Some(n) = name {
                    change["NewCustomKeyStoreName"] = json!(n);
                }
                if let Some(m) = min_tokens {
                    change["HsmkmsMinTokens"] = json!(m);
                }
                update(&mut kms, &store, change).await?
            }
            StoreCommand::Connect { store } => {
                let now = call(&mut kms, "DescribeCustomKeyStores", by_id(&store)).await?;
                // A FAILED store is disconnected first, as AWS requires.
                if now["CustomKeyStores"][0]["ConnectionState"] == "FAILED" {
                    call(&mut kms, "DisconnectCustomKeyStore", by_id(&store)).await?;
                }
                call(&mut kms, "ConnectCustomKeyStore", by_id(&store)).await?;
                wait_connected(&mut kms, &store, wait).await?
            }
            StoreCommand::Disconnect { store } => {
                call(&mut kms, "DisconnectCustomKeyStore", by_id(&store)).await?;
                json!({ "CustomKeyStoreId": store, "ConnectionState": "DISCONNECTED" })
            }
            StoreCommand::Delete { store } => {
                call(&mut kms, "DeleteCustomKeyStore", by_id(&store)).await?;
                json!({ "CustomKeyStoreId": store, "Deleted": true })
            }
        };
        println!("{out}");
        Ok(())
    })
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Rotate the key behind an alias by hand: create a new key in the same store, move the
    /// alias to it, keep the old key so that old ciphertexts still decrypt. Prints JSON with
    /// AliasName, OldKeyId and NewKeyId. Safe to run while the service is serving.
    RotateManually {
        #[command(flatten)]
        target: Target,
        /// The alias to move, e.g. alias/app-data.
        #[arg(value_name = "ALIAS")]
        alias: String,
    },
}

#[derive(Subcommand)]
enum BackupCommand {
    /// Write a backup of a key store's keys and their aliases to FILE (mode 0600), and record
    /// it in the catalogue.
    Create {
        #[command(flatten)]
        target: Target,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// The key store (default: the configured one, or the only one).
        #[arg(long, value_name = "ID")]
        store: Option<String>,
    },
    /// The backups made so far, oldest first, with whether each file is still as written.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Check a backup against a key store's cluster: format, domain key, integrity tag.
    Verify {
        #[command(flatten)]
        target: Target,
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// The key store (default: the one the backup was made of, else the default one).
        #[arg(long, value_name = "ID")]
        store: Option<String>,
    },
    /// Restore a backup: missing keys, token copies and aliases come back; nothing present
    /// changes. With --dry-run, only say what would change.
    Restore {
        #[command(flatten)]
        target: Target,
        #[arg(value_name = "FILE")]
        file: PathBuf,
        #[arg(long)]
        dry_run: bool,
        /// The key store to restore into (default: the one the backup was made of, else the
        /// default one). Its tokens must hold the backup's domain key.
        #[arg(long, value_name = "ID")]
        store: Option<String>,
    },
}

/// The service's parts for a command run beside the server (or instead of it). No crash
/// recovery: that is the serving process's alone.
async fn open_store(config: &Config) -> Result<keystore::app::Parts, String> {
    keystore::app::build(
        config,
        std::sync::Arc::new(keystore::clock::SystemClock),
        keystore::app::worker_command()?,
    )
    .await
}

fn kms_message(e: keystore::error::KmsError) -> String {
    format!("{}: {}", e.code(), e.public_message())
}

fn read_file(file: &std::path::Path) -> Result<Vec<u8>, String> {
    std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))
}

fn run_backup(command: BackupCommand) -> Result<(), String> {
    let target = match &command {
        BackupCommand::Create { target, .. }
        | BackupCommand::List { target }
        | BackupCommand::Verify { target, .. }
        | BackupCommand::Restore { target, .. } => target,
    };
    let config = load(target)?;
    if let BackupCommand::List { .. } = command {
        // The catalogue only: no token is needed.
        let store =
            keystore::store::SqliteStore::open(&config.metadata_path).map_err(kms_message)?;
        let list = keystore::backup::list(&store).map_err(kms_message)?;
        println!("{}", serde_json::json!({ "Backups": list }));
        return Ok(());
    }
    runtime().block_on(async move {
        let parts = open_store(&config).await?;
        let kms = kms_message;
        use keystore::backup::target_store;
        let out = match command {
            BackupCommand::Create { out, store, .. } => {
                let store = target_store(&parts, store.as_deref(), None).map_err(kms)?;
                let record = keystore::backup::create_file(&parts, &store, &out).await.map_err(kms)?;
                serde_json::json!({ "File": record.path, "KeyStoreId": record.key_store_id, "Keys": record.keys, "Aliases": record.aliases, "DomainKcv": record.domain_kcv, "Sha256": record.sha256 })
            }
            BackupCommand::Verify { file, store, .. } => {
                let bytes = read_file(&file)?;
                let claimed = keystore::backup::parse(&bytes).map_err(kms)?;
                let store = target_store(&parts, store.as_deref(), Some(&claimed.key_store_id)).map_err(kms)?;
                let b = keystore::backup::verify(&store, &bytes).await.map_err(kms)?;
                serde_json::json!({ "File": file, "Valid": true, "KeyStoreId": store.id(), "Keys": b.keys.len(), "Aliases": b.aliases.len(), "CreatedMs": b.created_ms })
            }
            BackupCommand::Restore { file, dry_run, store, .. } => {
                let bytes = read_file(&file)?;
                let claimed = keystore::backup::parse(&bytes).map_err(kms)?;
                let store = target_store(&parts, store.as_deref(), Some(&claimed.key_store_id)).map_err(kms)?;
                serde_json::to_value(keystore::backup::restore(&parts, &store, &bytes, dry_run).await.map_err(kms)?)
                    .map_err(|e| e.to_string())?
            }
            BackupCommand::List { .. } => unreachable!("answered above"),
        };
        println!("{out}");
        Ok(())
    })
}

#[derive(Subcommand)]
enum TdeCommand {
    /// Database clients: each gets a token that reads only its own keys.
    Client {
        #[command(subcommand)]
        command: TdeClientCommand,
    },
    /// TDE keys: numbered secrets with versions, stored only wrapped under a KMS key.
    Key {
        #[command(subcommand)]
        command: TdeKeyCommand,
    },
}

#[derive(Subcommand)]
enum TdeClientCommand {
    /// Create a client and print its token (shown only this once; only a hash is kept).
    Create {
        #[command(flatten)]
        target: Target,
        /// The client's name, e.g. the database's host name.
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Revoke a client's token: its reads are refused from now on.
    Revoke {
        #[command(flatten)]
        target: Target,
        #[arg(value_name = "NAME")]
        name: String,
    },
}

#[derive(Subcommand)]
enum TdeKeyCommand {
    /// Create key ID (version 1) for a client, its material generated under a KMS key.
    Create {
        #[command(flatten)]
        target: Target,
        /// The client that may read the key.
        #[arg(long, value_name = "NAME")]
        client: String,
        /// The KMS key that wraps the material: key id, key ARN, alias name or alias ARN.
        #[arg(long, value_name = "KEY")]
        kms_key: String,
        /// Key length in bytes: 16, 24 or 32.
        #[arg(long, default_value_t = 32)]
        bytes: usize,
        /// The key id the database uses (MariaDB: 1 for system data, 2 for temporary data,
        /// any other for ENCRYPTION_KEY_ID=).
        #[arg(value_name = "ID")]
        id: u32,
    },
    /// Add a version with fresh material (the table key rotates; the KMS key does not).
    Rotate {
        #[command(flatten)]
        target: Target,
        #[arg(long, value_name = "NAME")]
        client: String,
        #[arg(value_name = "ID")]
        id: u32,
    },
    /// List keys, with their latest versions.
    List {
        #[command(flatten)]
        target: Target,
        /// Only this client's keys.
        #[arg(long, value_name = "NAME")]
        client: Option<String>,
    },
    /// Stop serving a key (reads answer 404).
    Disable {
        #[command(flatten)]
        target: Target,
        #[arg(long, value_name = "NAME")]
        client: String,
        #[arg(value_name = "ID")]
        id: u32,
    },
    /// Serve a disabled key again.
    Enable {
        #[command(flatten)]
        target: Target,
        #[arg(long, value_name = "NAME")]
        client: String,
        #[arg(value_name = "ID")]
        id: u32,
    },
}

/// Runs a TDE command against the store and tokens of a configuration, printing JSON.
fn run_tde(command: TdeCommand) -> Result<(), String> {
    let target = match &command {
        TdeCommand::Client {
            command:
                TdeClientCommand::Create { target, .. } | TdeClientCommand::Revoke { target, .. },
        } => target,
        TdeCommand::Key {
            command:
                TdeKeyCommand::Create { target, .. }
                | TdeKeyCommand::Rotate { target, .. }
                | TdeKeyCommand::List { target, .. }
                | TdeKeyCommand::Disable { target, .. }
                | TdeKeyCommand::Enable { target, .. },
        } => target,
    };
    let config = load(target)?;
    runtime().block_on(async move {
        let parts = open_store(&config).await?;
        let tde = parts.tde();
        let kms = kms_message;
        let out = match command {
            TdeCommand::Client { command: TdeClientCommand::Create { name, .. } } => {
                let token = tde.create_client(&name).await.map_err(kms)?;
                serde_json::json!({ "Client": name, "Token": token.as_str() })
            }
            TdeCommand::Client { command: TdeClientCommand::Revoke { name, .. } } => {
                tde.revoke_client(&name).await.map_err(kms)?;
                serde_json::json!({ "Client": name, "Revoked": true })
            }
            TdeCommand::Key { command: TdeKeyCommand::Create { client, kms_key, bytes, id, .. } } => {
                serde_json::to_value(tde.create_key(&client, id, &kms_key, bytes).await.map_err(kms)?)
                    .map_err(|e| e.to_string())?
            }
            TdeCommand::Key { command: TdeKeyCommand::Rotate { client, id, .. } } => {
                let info = tde.rotate_key(&client, id).await.map_err(kms)?;
                serde_json::json!({ "Client": info.client, "Id": info.id, "Version": info.latest_version, "KmsKeyId": info.kms_key_id })
            }
            TdeCommand::Key { command: TdeKeyCommand::List { client, .. } } => {
                serde_json::json!({ "Keys": tde.list(client.as_deref()).await.map_err(kms)? })
            }
            TdeCommand::Key { command: TdeKeyCommand::Disable { client, id, .. } } => {
                serde_json::to_value(tde.set_enabled(&client, id, false).await.map_err(kms)?).map_err(|e| e.to_string())?
            }
            TdeCommand::Key { command: TdeKeyCommand::Enable { client, id, .. } } => {
                serde_json::to_value(tde.set_enabled(&client, id, true).await.map_err(kms)?).map_err(|e| e.to_string())?
            }
        };
        println!("{out}");
        Ok(())
    })
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("HSMKMS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if std::env::var("HSMKMS_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn load(target: &Target) -> Result<Config, String> {
    match (&target.config, &target.data_dir) {
        (Some(c), _) => Config::load(c),
        (None, Some(d)) => Config::load(&d.join("hsmkms.toml")),
        (None, None) => Err("give --config FILE or --data-dir DIR".into()),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Worker { args } = cli.command {
        // Workers talk frames on stdout; they log nothing there.
        return ExitCode::from(hsm::worker::main_with_args(args) as u8);
    }
    init_logging();
    let result =
        match cli.command {
            Command::Serve { config, listen } => Config::load(&config)
                .and_then(|c| runtime().block_on(keystore::app::serve(c, listen))),
            Command::Dev {
                data_dir,
                listen,
                tokens,
                tls_cert,
                tls_key,
                tde_listen,
                tde_tls_cert,
                tde_tls_key,
            } => keystore::app::worker_command()
                .and_then(|worker| keystore::dev::prepare_cluster(&data_dir, &worker, tokens))
                .and_then(|path| Config::load(&path))
                .and_then(|mut c| {
                    if tls_cert.is_some() {
                        c.tls_cert = tls_cert;
                        c.tls_key = tls_key;
                    }
                    if let Some(listen) = tde_listen {
                        let tde = keystore::config::TdeConfig {
                            listen,
                            mount: "tde".into(),
                            tls_cert: tde_tls_cert,
                            tls_key: tde_tls_key,
                        };
                        tde.validate(c.allow_non_loopback)?;
                        c.tde = Some(tde);
                    }
                    runtime().block_on(keystore::app::serve(c, listen))
                }),
            Command::Tde { command } => run_tde(command),
            Command::Backup { command } => run_backup(command),
            Command::Store { target, command } => run_store(target, command),
            Command::Key {
                command: KeyCommand::RotateManually { target, alias },
            } => {
                load(&target).and_then(|config| {
                    runtime().block_on(async {
                let parts = open_store(&config).await?;
                let (old, new) = parts.service.rotate_manually(&alias).await.map_err(kms_message)?;
                println!(
                    "{}",
                    serde_json::json!({ "AliasName": alias, "OldKeyId": old, "NewKeyId": new })
                );
                Ok(())
            })
                })
            }
            Command::Worker { .. } => unreachable!("handled above"),
        };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hsmkms: {e}");
            ExitCode::FAILURE
        }
    }
}
