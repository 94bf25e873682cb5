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
    },
    /// Manage keys without going through the HTTP API.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
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
    let result = match cli.command {
        Command::Serve { config, listen } => {
            Config::load(&config).and_then(|c| runtime().block_on(keystore::app::serve(c, listen)))
        }
        Command::Dev { data_dir, listen } => keystore::app::worker_command()
            .and_then(|worker| keystore::dev::prepare(&data_dir, &worker))
            .and_then(|path| Config::load(&path))
            .and_then(|c| runtime().block_on(keystore::app::serve(c, listen))),
        Command::Key {
            command: KeyCommand::RotateManually { target, alias },
        } => load(&target).and_then(|config| {
            runtime().block_on(async {
                let service = keystore::app::build_service(
                    &config,
                    std::sync::Arc::new(keystore::clock::SystemClock),
                    keystore::app::worker_command()?,
                )
                .await?;
                let (old, new) = service
                    .rotate_manually(&alias)
                    .await
                    .map_err(|e| format!("{}: {}", e.code(), e.public_message()))?;
                println!(
                    "{}",
                    serde_json::json!({ "AliasName": alias, "OldKeyId": old, "NewKeyId": new })
                );
                Ok(())
            })
        }),
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
