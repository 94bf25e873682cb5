//! Shared by the integration tests: fresh SoftHSM2 tokens, each in its own directory.
// Each test file uses a different part of this module.
#![allow(dead_code)]

use std::path::PathBuf;

use hsm::{TokenConfig, TokenPool, WorkerCommand};
use secrecy::SecretString;

pub const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const SO_PIN: &str = "so-pin-1234";

/// A fresh SoftHSM2 token in its own directory (own SOFTHSM2_CONF); removed when dropped.
pub struct TestToken {
    pub dir: tempfile::TempDir,
    pub config: TokenConfig,
}

pub fn worker() -> WorkerCommand {
    WorkerCommand {
        program: env!("CARGO_BIN_EXE_hsm-worker").into(),
        args: vec![],
    }
}

impl TestToken {
    pub fn new(workers: usize) -> TestToken {
        TestToken::labelled("test", workers)
    }

    pub fn labelled(label: &str, workers: usize) -> TestToken {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        // Provisioning loads the module in a process, which reads SOFTHSM2_CONF once; run it in a
        // child so that every token gets its own configuration.
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_hsm-worker"))
            .env("SOFTHSM2_CONF", &conf)
            .args(["provision", SOFTHSM, label])
            .stdout(std::process::Stdio::null())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin
                    .take()
                    .unwrap()
                    .write_all(format!("{SO_PIN}\nuser-pin-1234\n").as_bytes())?;
                c.wait()
            })
            .unwrap();
        assert!(status.success());
        TestToken {
            config: TokenConfig {
                module: PathBuf::from(SOFTHSM),
                label: label.into(),
                pin: SecretString::from("user-pin-1234"),
                workers,
                env: vec![("SOFTHSM2_CONF".into(), conf.display().to_string())],
                limits: Default::default(),
            },
            dir,
        }
    }

    pub async fn pool(&self) -> TokenPool {
        TokenPool::start(self.config.clone(), worker())
            .await
            .unwrap()
    }
}

/// Process ids of the workers of a token (they carry its SOFTHSM2_CONF in their environment).
pub fn worker_pids(conf_dir: &std::path::Path) -> Vec<i32> {
    let needle = format!("SOFTHSM2_CONF={}", conf_dir.join("softhsm2.conf").display());
    let mut pids = vec![];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|v| v == needle.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}
