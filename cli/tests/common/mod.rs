//! What the `sluicegate` binary's tests share: running it as a user would, and writing traces.

use std::io::Write;
use std::process::{Command, Output};

/// Runs `sluicegate ARGS` from the crate's directory (so `../data/...` names the bundled trace).
pub fn sluicegate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluicegate"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap()
}

/// Output bytes as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Writes a trace file under the test's temporary directory and returns its path.
pub fn trace_file(name: &str, body: &str) -> String {
    let path = format!("{}/{name}", env!("CARGO_TARGET_TMPDIR"));
    std::fs::File::create(&path).unwrap().write_all(body.as_bytes()).unwrap();
    path
}

/// The header line of sluicegate's own trace format.
pub const HEADER: &str =
    "t_ms,account,model,variant,priority,n,prompt_tokens,cached_tokens,max_tokens,generated_tokens\n";
