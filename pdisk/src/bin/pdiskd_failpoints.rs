//! pdiskd built with the `failpoints` feature: the same daemon, with the
//! crash points of `pdisk::failpoints` read from FAILPOINTS. Only the
//! fault-injection test (pdisk/tests/faults.rs) runs it.

#[path = "pdiskd.rs"]
mod pdiskd;

fn main() {
    pdiskd::main()
}
