//! agentd built with the `failpoints` feature: the same daemon, with the
//! crash points of `agent::failpoints` read from FAILPOINTS. Only the
//! fault-injection test (agent/tests/faults.rs) runs it.

#[path = "agentd.rs"]
mod agentd;

fn main() {
    agentd::main()
}
