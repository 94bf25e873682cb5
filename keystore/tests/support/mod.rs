//! Shared by the integration tests: starting the real server, finding its workers.
// Each test file uses a different part of this module.
#![allow(dead_code)]

pub mod attacker;

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use hsm::WorkerCommand;
use keystore::client::KmsClient;
use keystore::dev::{DEV_ACCESS_KEY_ID, DEV_SECRET_ACCESS_KEY};
use secrecy::SecretString;

/// Workers are the hsmkms binary under test, run as `hsmkms worker`.
pub fn worker() -> WorkerCommand {
    WorkerCommand {
        program: env!("CARGO_BIN_EXE_hsmkms").into(),
        args: vec!["worker".into()],
    }
}

/// A running `hsmkms` process and the addresses it printed.
pub struct Server {
    pub process: Child,
    /// `host:port` of the KMS front.
    pub kms: String,
    /// `host:port` of the TDE front, when it was asked for.
    pub tde: Option<String>,
}

impl Server {
    /// Runs `hsmkms ARGS` (e.g. `dev --data-dir D --listen 127.0.0.1:0`) and waits for its
    /// "listening" lines.
    pub fn start(args: &[&str]) -> Server {
        let mut process = Command::new(env!("CARGO_BIN_EXE_hsmkms"))
            .args(args)
            .env("HSMKMS_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(process.stdout.take().unwrap()).lines();
        let mut address = || {
            let line = lines
                .next()
                .expect("server exited before listening")
                .unwrap();
            let addr = line.rsplit("://").next().unwrap().to_string();
            assert!(addr.contains(':'), "server did not start: {line:?}");
            addr
        };
        let kms = address();
        let tde = args.contains(&"--tde-listen").then(&mut address);
        Server { process, kms, tde }
    }

    pub fn dev(dir: &Path, extra: &[&str]) -> Server {
        let dir = dir.to_str().unwrap();
        let mut args = vec!["dev", "--data-dir", dir, "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        Server::start(&args)
    }

    pub fn client(&self) -> KmsClient {
        KmsClient::new(
            &self.kms,
            DEV_ACCESS_KEY_ID,
            SecretString::from(DEV_SECRET_ACCESS_KEY),
            "us-east-1",
        )
    }

    pub fn id(&self) -> u32 {
        self.process.id()
    }

    /// SIGKILL, then reap.
    pub fn kill(self) {
        drop(self);
    }
}

/// A test that fails midway must not leave its server running (holding the test's output pipe).
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// The child processes of `pid` (the server's token workers).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the command name, which is in parentheses and may hold spaces.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        if after.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            out.push(child);
        }
    }
    out
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    // The dumps are large (mimalloc reserves address space, which gcore writes out as zeros):
    // a SIMD substring search keeps this test to seconds.
    memchr::memmem::find(haystack, needle).is_some()
}

/// Dumps a process's memory with gcore and says which of `needles` it holds.
pub fn memory_holds(pid: u32, needles: &[&[u8]], dir: &std::path::Path) -> Vec<bool> {
    let prefix = dir.join(format!("core-{pid}"));
    let status = std::process::Command::new("gcore")
        .arg("-o")
        .arg(&prefix)
        .arg(pid.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("gcore (from gdb) is needed for this test; .ci/run installs it");
    assert!(status.success(), "gcore failed for {pid}");
    let path = dir.join(format!("core-{pid}.{pid}"));
    let dump = std::fs::read(&path).unwrap();
    assert!(
        dump.len() > 1 << 20,
        "core dump of {pid} is implausibly small"
    );
    // Most of a dump is zero pages (reserved address space): search only the others, so that
    // many needles cost many passes over megabytes, not gigabytes. No needle holds a zero byte,
    // so none can span a dropped page.
    let mut live = Vec::new();
    for page in dump.chunks(4096).filter(|p| p.iter().any(|b| *b != 0)) {
        live.extend_from_slice(page);
    }
    drop(dump);
    let found = needles.iter().map(|n| contains(&live, n)).collect();
    std::fs::remove_file(&path).unwrap();
    found
}
