//! A token worker process; see `hsm::worker`. Started by the service, never by hand.
fn main() {
    std::process::exit(hsm::worker::main_with_args(
        std::env::args().skip(1).collect(),
    ));
}
