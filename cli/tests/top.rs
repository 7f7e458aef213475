//! `sluicegate top` against a shared engine another process served traffic into: the JSON
//! snapshot equals what that process admitted, the interactive view (under tmux) shows the
//! busiest scope and its limit, and the region's file is not changed by watching it.

use std::process::Command;
use std::time::{Duration, Instant};

use sluicegate_core::{Capacity, Engine, Policy, Request, ScopeKey};

const SERVE: &str = "SLUICEGATE_TOP_SERVE";
const MODEL: &[u8] = b"llama-v3p1-8b";

/// The serving process: run as a child of the test below (the test binary re-run with `SERVE`
/// set), it admits 50 requests for one account and 10 for another, settling none, and exits.
#[test]
fn serve_into_a_shared_engine() {
    let Ok(path) = std::env::var(SERVE) else { return };
    let engine = Engine::open_shared(&path, Policy::fixed(), Capacity::scopes(256)).unwrap();
    for (account, n) in [(&b"acct-busiest"[..], 50), (b"acct-other", 10)] {
        for _ in 0..n {
            let d = engine.admit(
                ScopeKey::new(account, MODEL),
                &Request::new(100),
                sluicegate_core::clock::now_ns(),
            );
            assert!(d.unwrap().admitted());
        }
    }
}

const HANG: &str = "SLUICEGATE_TOP_HANG";

/// The process killed mid-request: run as a child with `HANG` set to the file, it admits 20
/// requests, says so on stdout, and waits (holding its permits) to be killed.
#[test]
fn serve_then_hang() {
    let Ok(path) = std::env::var(HANG) else { return };
    let engine = Engine::open_shared(&path, Policy::fixed(), Capacity::scopes(256)).unwrap();
    for _ in 0..20 {
        let d = engine.admit(
            ScopeKey::new(b"acct-killed", MODEL),
            &Request::new(1),
            sluicegate_core::clock::now_ns(),
        );
        assert!(d.unwrap().admitted());
    }
    println!("serving");
    std::thread::sleep(Duration::from_secs(120));
}

/// A worker killed (SIGKILL) while its 20 requests run: `top` shows them in flight; once another
/// process's clock is past their TTL and its next tick sweeps the ledger, they are counted
/// expired and nothing is left in flight but that process's own request.
#[test]
fn top_counts_a_killed_workers_permits_expired_after_their_ttl() {
    use std::io::BufRead;
    let path = format!("{}/top-killed-{}.region", env!("CARGO_TARGET_TMPDIR"), std::process::id());
    let _ = std::fs::remove_file(&path);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "serve_then_hang", "--test-threads", "1", "--nocapture"])
        .env(HANG, &path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.unwrap().contains("serving")), "the child never served");
    child.kill().unwrap(); // SIGKILL: no settle, no drop
    child.wait().unwrap();

    let read = || -> serde_json::Value {
        let out = sluicegate(&["top", &path, "--once", "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let before = read();
    assert_eq!(before["scopes"][0]["in_flight"], 20, "{before}");
    assert_eq!(before["totals"]["expired"], 0);

    let survivor = Engine::open_shared(&path, Policy::fixed(), Capacity::scopes(256)).unwrap();
    let later = sluicegate_core::clock::now_ns() + survivor.policy().permit_ttl_ns + 120_000_000_000;
    assert!(survivor.admit(ScopeKey::new(b"acct-alive", MODEL), &Request::new(1), later).unwrap().admitted());
    let after = read();
    assert_eq!(after["totals"]["expired"], 20, "{after}");
    assert_eq!(after["totals"]["admitted"], 21);
    assert_eq!(after["models"][0]["in_flight"], 1, "{after}");
    drop(survivor);
    let _ = std::fs::remove_file(&path);
}

fn sluicegate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sluicegate")).args(args).output().unwrap()
}

#[test]
fn top_shows_what_another_process_served_and_writes_nothing() {
    let path = format!("{}/top-{}.region", env!("CARGO_TARGET_TMPDIR"), std::process::id());
    let _ = std::fs::remove_file(&path);
    let served = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "serve_into_a_shared_engine", "--test-threads", "1"])
        .env(SERVE, &path)
        .status()
        .unwrap();
    assert!(served.success());
    let before = std::fs::read(&path).unwrap();

    let out = sluicegate(&["top", &path, "--once", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let busiest = &json["scopes"][0];
    assert_eq!(busiest["account"], "acct-busiest", "{json}");
    assert_eq!(busiest["model"], "llama-v3p1-8b");
    assert_eq!(busiest["variant"], "regular");
    assert_eq!(busiest["in_flight"], 50);
    assert_eq!(busiest["limits"]["requests"], 60);
    // A refill of one request a second may land between serving and reading.
    let remaining = busiest["remaining"]["requests"].as_u64().unwrap();
    assert!((10..=12).contains(&remaining), "{json}");
    assert_eq!(json["scopes"][1]["account"], "acct-other");
    assert_eq!(json["scopes"][1]["in_flight"], 10);
    assert_eq!(json["scope_count"], 2);
    assert_eq!(json["totals"]["admitted"], 60);
    assert_eq!(json["totals"]["rate_limited_requests"], 0);
    let model = &json["models"][0];
    assert_eq!((model["model"].as_str(), model["in_flight"].as_u64()), (Some("llama-v3p1-8b"), Some(60)));
    assert_eq!(model["counts"]["default"]["admitted"], 60);

    // The interactive view, in a real terminal: the busiest scope's account and its limit.
    let session = format!("sluicegate-top-{}", std::process::id());
    let bin = env!("CARGO_BIN_EXE_sluicegate");
    let started = Command::new("tmux")
        .args([
            "new-session",
            "-d",
            "-s",
            &session,
            "-x",
            "160",
            "-y",
            "40",
            bin,
            "top",
            &path,
            "--interval-ms",
            "200",
        ])
        .status()
        .expect("tmux must be installed (.ci/run installs it)");
    assert!(started.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut screen = String::new();
    while Instant::now() < deadline {
        let capture = Command::new("tmux").args(["capture-pane", "-p", "-t", &session]).output().unwrap();
        screen = String::from_utf8_lossy(&capture.stdout).into_owned();
        if screen.contains("acct-busiest") && screen.contains("/60") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = Command::new("tmux").args(["send-keys", "-t", &session, "q"]).status();
    std::thread::sleep(Duration::from_millis(300));
    // Gone already if `q` quit it, which is what this is for otherwise.
    let _ = Command::new("tmux")
        .args(["kill-session", "-t", &session])
        .stderr(std::process::Stdio::null())
        .status();
    let busiest_line =
        screen.lines().find(|l| l.contains("acct-busiest")).unwrap_or_else(|| panic!("{screen}"));
    assert!(busiest_line.contains("llama-v3p1-8b") && busiest_line.contains("/60"), "{screen}");
    assert!(screen.contains("busiest scopes"), "{screen}");
    eprintln!("{screen}");

    // Watching wrote nothing: the file is byte for byte what the serving process left.
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // Not a region: a clear error, no crash.
    let bad = format!("{path}.txt");
    std::fs::write(&bad, vec![b'x'; 4096]).unwrap();
    let out = sluicegate(&["top", &bad, "--once"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a sluicegate region"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&bad);
}
