//! Building the service from its configuration, and serving it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hsm::{TokenConfig, WorkerCommand};

use crate::api::{router, KmsFront};
use crate::clock::{Clock, SystemClock};
use crate::config::{read_secret_file, Config, TdeConfig, TokenEntry};
use crate::ids::ArnScope;
use crate::key_stores::KeyStoreRecord;
use crate::listener::Door;
use crate::service::Service;
use crate::sigv4::{Principal, Principals};
use crate::store::SqliteStore;
use crate::tde::front::{tls_acceptor, TdeFront};
use crate::tde::Tde;

/// Workers run as `hsmkms worker`: the same binary, so nothing else needs installing.
pub fn worker_command() -> Result<WorkerCommand, String> {
    let program =
        std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    Ok(WorkerCommand {
        program,
        args: vec!["worker".into()],
    })
}

fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// How to reach one configured token.
pub fn token_config(entry: &TokenEntry) -> Result<TokenConfig, String> {
    Ok(TokenConfig {
        module: entry.module.clone(),
        label: entry.label.clone(),
        pin: read_secret_file(&entry.pin_file)?,
        workers: entry.workers.unwrap_or_else(default_workers),
        env: entry
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        limits: Default::default(),
    })
}

/// Opens the metadata store and connects the key stores that were connected when the service
/// last ran (the configuration's `[key_store]` is recorded there the first time).
pub async fn build(
    config: &Config,
    clock: Arc<dyn Clock>,
    command: WorkerCommand,
) -> Result<Parts, String> {
    let store = Arc::new(SqliteStore::open(&config.metadata_path).map_err(|e| e.to_string())?);
    let service = Service::new(
        ArnScope {
            partition: config.partition.clone(),
            region: config.region.clone(),
            account: config.account.clone(),
        },
        store.clone(),
        clock.clone(),
        command,
        config.key_store.as_ref().map(|ks| ks.id.clone()),
    )
    .map_err(|e| e.to_string())?;
    if let Some(ks) = &config.key_store {
        service
            .seed_key_store(KeyStoreRecord {
                id: ks.id.clone(),
                name: ks.name.clone(),
                cluster_id: ks.cluster_id.clone(),
                tokens: ks.tokens.clone(),
                min_tokens: ks.min_tokens,
                dev: ks.tokens.len() == 1,
                created_ms: clock.now_ms(),
                want_connected: true,
            })
            .await
            .map_err(|e| e.to_string())?;
    }
    service.connect_wanted_stores().await;
    Ok(Parts {
        service: Arc::new(service),
        store,
        clock,
    })
}

/// The service with the metadata store and clock it was built on (the TDE keys share them).
pub struct Parts {
    pub service: Arc<Service>,
    pub store: Arc<SqliteStore>,
    pub clock: Arc<dyn Clock>,
}

impl Parts {
    pub fn tde(&self) -> Tde {
        Tde::new(self.service.clone(), self.store.clone(), self.clock.clone())
    }
}

/// Starts the token workers and opens the metadata store.
pub async fn build_service(
    config: &Config,
    clock: Arc<dyn Clock>,
    command: WorkerCommand,
) -> Result<Arc<Service>, String> {
    Ok(build(config, clock, command).await?.service)
}

/// Rolls back creations a crash interrupted. Only the serving process may do this: a tool run
/// beside it would take the server's own in-flight creations for abandoned ones.
pub async fn recover(service: &Service) -> Result<(), String> {
    let rolled_back = service.recover().await.map_err(|e| e.to_string())?;
    if rolled_back > 0 {
        tracing::warn!(rolled_back, "rolled back interrupted key creations");
    }
    Ok(())
}

pub fn principals(config: &Config) -> Result<Principals, String> {
    let mut list = Vec::new();
    for p in &config.principals {
        let secret = match (&p.secret_access_key, &p.secret_access_key_file) {
            (Some(s), None) => s.clone(),
            (None, Some(f)) => read_secret_file(f)?,
            _ => {
                return Err(format!(
                    "principal {}: set exactly one secret source",
                    p.name
                ))
            }
        };
        list.push(Principal {
            name: p.name.clone(),
            access_key_id: p.access_key_id.clone(),
            secret_access_key: secret,
            admin: p.admin,
        });
    }
    Ok(Principals::new(list))
}

/// Serves until SIGINT or SIGTERM, then lets requests in flight finish (within
/// `listener.shutdown_grace_secs`). Prints `hsmkms listening on http://ADDR` on stdout once bound.
pub async fn serve(config: Config, listen: Option<SocketAddr>) -> Result<(), String> {
    // First of all: a SIGTERM that comes as soon as "listening" is printed (or earlier) must
    // find its handler in place, or the process dies of the signal mid-request.
    let stop = StopSignals::install()?;
    let file_limit = crate::listener::raise_open_file_limit();
    let addr = listen.unwrap_or(config.listen);
    config.check_listen(addr)?;
    let kms_tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(crate::tls::tls_acceptor(cert, key)?),
        _ => None,
    };
    let tls = match &config.tde {
        Some(TdeConfig {
            tls_cert: Some(cert),
            tls_key: Some(key),
            ..
        }) => Some(tls_acceptor(cert, key)?),
        _ => None,
    };
    let parts = build(&config, Arc::new(SystemClock), worker_command()?).await?;
    let service = parts.service.clone();
    recover(&service).await?;
    let front = Arc::new(KmsFront {
        service: service.clone(),
        principals: principals(&config)?,
        metrics: Default::default(),
    });
    let reaper = {
        let service = service.clone();
        let every = Duration::from_secs(config.deletion_check_interval_secs.max(1));
        tokio::spawn(async move {
            loop {
                if let Err(e) = service.delete_due_keys().await {
                    tracing::error!(error = %e, "deleting keys whose waiting period ended failed; will retry");
                }
                tokio::time::sleep(every).await;
            }
        })
    };
    let prober = {
        let service = service.clone();
        let every = Duration::from_secs(config.probe_interval_secs.max(1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = service.probe_tokens().await {
                    tracing::warn!(error = %e, "token probe failed; will retry");
                }
            }
        })
    };
    // The workers run now: what they and SQLite hold, plus a reserve, stays out of the cap.
    let fitting = crate::listener::default_max_connections(
        file_limit,
        crate::listener::open_files().unwrap_or(64),
    );
    let capacity = match config.listener.max_connections {
        Some(n) if n > fitting => {
            tracing::warn!(
                max_connections = n,
                file_limit,
                capacity = fitting,
                "listener.max_connections does not fit the open-file limit; lowered"
            );
            fitting
        }
        Some(n) => n,
        None => fitting,
    };
    let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
    let door = Door::new(capacity, config.listener.limits(), shutdown);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let scheme = if kms_tls.is_some() { "https" } else { "http" };
        let _ = writeln!(out, "hsmkms listening on {scheme}://{bound}");
        let _ = out.flush();
        // Where `hsmkms store` finds the service; best effort, it may also be told --endpoint.
        let _ = std::fs::write(
            crate::store_cli::endpoint_file(&config),
            format!("{scheme}://{bound}\n"),
        );
    }
    tracing::info!(address = %bound, max_connections = capacity, file_limit, "serving the KMS JSON API");
    let tde = match &config.tde {
        Some(tde_config) => {
            let listener = tokio::net::TcpListener::bind(tde_config.listen)
                .await
                .map_err(|e| format!("cannot listen on {} for TDE: {e}", tde_config.listen))?;
            let bound = listener.local_addr().map_err(|e| e.to_string())?;
            let scheme = if tls.is_some() { "https" } else { "http" };
            {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "hsmkms tde listening on {scheme}://{bound}");
                let _ = out.flush();
            }
            tracing::info!(address = %bound, scheme, mount = %tde_config.mount, "serving TDE keys (Vault KV v2)");
            let front = Arc::new(TdeFront {
                tde: Arc::new(parts.tde()),
                mount: tde_config.mount.clone(),
            });
            Some(tokio::spawn(crate::tde::front::serve(
                listener,
                front,
                tls,
                door.clone(),
            )))
        }
        None => None,
    };
    let kms = tokio::spawn(crate::listener::serve_router(
        listener,
        kms_tls,
        door,
        router(front),
    ));
    let signal = stop.wait().await;
    tracing::info!(
        signal,
        "stopping: no new connections; requests in flight may finish"
    );
    let _ = shutdown_tx.send(true);
    let _ = kms.await;
    if let Some(tde) = tde {
        let _ = tde.await;
    }
    reaper.abort();
    prober.abort();
    tracing::info!("stopped");
    Ok(())
}

/// SIGTERM and SIGINT handlers, installed at once (tokio's `ctrl_c()` installs its handler only
/// when first polled).
pub struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub fn install() -> Result<StopSignals, String> {
        use tokio::signal::unix::{signal, SignalKind};
        let handler = |kind, name| {
            signal(kind).map_err(|e| format!("cannot install the {name} handler: {e}"))
        };
        Ok(StopSignals {
            term: handler(SignalKind::terminate(), "SIGTERM")?,
            int: handler(SignalKind::interrupt(), "SIGINT")?,
        })
    }

    /// Waits for either; returns its name.
    pub async fn wait(mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
