//! A token worker process; see `hsm::worker`. Started by the service, never by hand.
//!
//! `hsm-worker provision MODULE LABEL` initialises a token (SO PIN then user PIN, one per line on
//! stdin) if no token has that label; tests and `softhsm-setup` use it.

use std::io::BufRead;

use secrecy::SecretString;
use zeroize::Zeroizing;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [] => hsm::worker::run().map_err(|e| e.to_string()),
        [cmd, module, label] if cmd == "provision" => provision(module, label),
        _ => Err("usage: hsm-worker [provision MODULE LABEL]".into()),
    };
    if let Err(e) = result {
        eprintln!("hsm-worker: {e}");
        std::process::exit(1);
    }
}

fn provision(module: &str, label: &str) -> Result<(), String> {
    let mut lines = std::io::stdin().lock().lines();
    let mut next = |what: &str| -> Result<SecretString, String> {
        let line = Zeroizing::new(
            lines
                .next()
                .ok_or(format!("missing {what} on stdin"))?
                .map_err(|e| e.to_string())?,
        );
        Ok(SecretString::from(line.trim_end()))
    };
    let so_pin = next("SO PIN")?;
    let user_pin = next("user PIN")?;
    let created = hsm::provision::ensure_token(module.as_ref(), label, &so_pin, &user_pin)?;
    println!("{}", if created { "created" } else { "exists" });
    Ok(())
}
