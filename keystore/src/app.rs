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

/// Serves until SIGINT or SIGTERM. Prints `hsmkms listening on http://ADDR` on stdout once bound.
pub async fn serve(config: Config, listen: Option<SocketAddr>) -> Result<(), String> {
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
    tracing::info!(address = %bound, "serving the KMS JSON API");
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
            Some(tokio::spawn(crate::tde::front::serve(listener, front, tls)))
        }
        None => None,
    };
    match kms_tls {
        Some(tls) => {
            tokio::select! {
                _ = crate::tls::serve_router(listener, tls, router(front)) => {}
                _ = shutdown_signal() => {}
            }
        }
        None => {
            // Small request/response pairs on kept-alive connections: don't let Nagle hold them back.
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(listener, router(front))
                .with_graceful_shutdown(shutdown_signal())
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    reaper.abort();
    prober.abort();
    if let Some(tde) = tde {
        tde.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
