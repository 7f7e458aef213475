//! The `sluicegate` binary, run as a user would.

use std::io::Write;
use std::process::{Command, Output};

fn sluicegate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluicegate"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn trace_file(name: &str, body: &str) -> String {
    let path = format!("{}/{name}", env!("CARGO_TARGET_TMPDIR"));
    std::fs::File::create(&path).unwrap().write_all(body.as_bytes()).unwrap();
    path
}

const HEADER: &str =
    "t_ms,account,model,variant,priority,n,prompt_tokens,cached_tokens,max_tokens,generated_tokens\n";

/// Rows of (minute, demanded, admitted, over_limit, 429, 503, limits…) from `--csv -`.
fn csv_rows(out: &Output) -> Vec<Vec<u64>> {
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    assert_eq!(
        lines.next(),
        Some(
            "minute,demanded,admitted,over_limit,rate_limited,shed,limit_requests,limit_prompt_tokens,limit_uncached_prompt_tokens,limit_generated_tokens"
        )
    );
    lines.map(|l| l.split(',').map(|v| v.parse().unwrap_or(u64::MAX)).collect()).collect()
}

#[test]
fn replaying_a_sustained_trace_reproduces_the_published_ramp() {
    // 1,600 requests a minute for two hours: always more than the limit allows.
    let mut body = String::from(HEADER);
    for i in 0..121 * 1_600u64 {
        body.push_str(&format!("{},acct,llama,regular,0,1,1000,0,100,100\n", i * 60_000 / 1_600));
    }
    let out = sluicegate(&["replay", &trace_file("sustained.csv", &body), "--csv", "-"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows = csv_rows(&out);
    for (minute, rpm) in [(0, 60), (10, 120), (60, 720), (120, 1_440)] {
        let row = &rows[minute];
        let within = |got: u64, want: u64| (got as f64 - want as f64).abs() <= want as f64 * 0.01;
        assert!(within(row[6], rpm), "minute {minute}: {} RPM", row[6]);
        assert!(within(row[7], rpm * 1_000), "minute {minute}: {} prompt TPM", row[7]);
        assert!(within(row[9], rpm * 100), "minute {minute}: {} generated TPM", row[9]);
    }
}

#[test]
fn every_request_of_every_minute_is_accounted_for() {
    let mut body = String::from(HEADER);
    for i in 0..3_000u64 {
        let n = if i % 97 == 0 { 0 } else { 1 }; // some invalid requests
        body.push_str(&format!("{},acct-{},m,regular,{},{n},500,0,50,40\n", i * 40, i % 3, i % 5 == 0));
    }
    let out = sluicegate(&["replay", &trace_file("mixed.csv", &body)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let mut checked = 0;
    for line in stdout.lines().skip(2) {
        let v: Vec<u64> = line.split_whitespace().take(7).map(|x| x.parse().unwrap()).collect();
        let [_, demanded, admitted, over, limited, shed, refused] = v[..] else { panic!("{line}") };
        assert_eq!(admitted + over + limited + shed + refused, demanded, "{line}");
        checked += demanded;
    }
    assert_eq!(checked, 3_000);
}

#[test]
fn a_malformed_trace_reports_line_numbers_and_strict_fails() {
    let rows = [
        "0,a,m,regular,0,1,10,0,5,5",
        "100,a,m",
        "200,a,m,regular,0,1,10,0,5,5",
        "150,a,m,regular,0,1,10,0,5,5",
        "300,a,m,regular,0,1,-4,0,5,5",
        "400,a,m,sideways,0,1,10,0,5,5",
    ];
    let body = format!("{HEADER}{}\n", rows.join("\n"));
    let path = trace_file("bad.csv", &body);
    let lenient = sluicegate(&["replay", &path]);
    assert!(lenient.status.success());
    let stderr = text(&lenient.stderr);
    assert!(stderr.contains("line 3: skipped: missing field"), "{stderr}");
    assert!(stderr.contains("line 5: skipped: timestamp out of order"), "{stderr}");
    assert!(stderr.contains("line 6: skipped: prompt_tokens is negative"), "{stderr}");
    assert!(stderr.contains("line 7: skipped: variant must be regular or fast"), "{stderr}");
    assert!(text(&lenient.stdout).contains("4 bad rows skipped"));
    let strict = sluicegate(&["replay", &path, "--strict"]);
    assert!(!strict.status.success());
    assert!(text(&strict.stderr).contains("line 3: missing field"), "{}", text(&strict.stderr));
    let unknown = sluicegate(&["replay", &trace_file("other.csv", "a,b,c\n1,2,3\n")]);
    assert!(!unknown.status.success());
    assert!(text(&unknown.stderr).contains("unknown trace format"));
}

#[test]
fn the_azure_trace_replays_end_to_end_with_csv_and_plot() {
    let svg = format!("{}/azure.svg", env!("CARGO_TARGET_TMPDIR"));
    let out = sluicegate(&[
        "replay",
        "../data/azure_llm_2023_conv.csv",
        "--csv",
        "-",
        "--plot",
        &svg,
        "--accounts",
        "4",
        "--priority-share",
        "0.2",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows = csv_rows(&out);
    assert_eq!(rows.len(), 59);
    assert_eq!(rows.iter().map(|r| r[1]).sum::<u64>(), 19_366);
    for r in &rows {
        assert_eq!(r[2] + r[3] + r[4] + r[5], r[1], "minute {}", r[0]);
    }
    let drawn = std::fs::read_to_string(&svg).unwrap();
    assert!(
        drawn.starts_with("<svg")
            && drawn.contains("rate limited (429)")
            && drawn.contains("request limit (RPM)")
    );
}

#[test]
fn policies_are_overridable_and_headers_shown() {
    let body = format!("{HEADER}0,a,m,regular,0,1,10,0,5,5\n10,a,m,regular,0,1,10,0,5,5\n");
    let path = trace_file("two.csv", &body);
    let out = sluicegate(&[
        "replay",
        &path,
        "--policy",
        "fixed",
        "--set",
        "requests_per_minute=1",
        "--headers",
        "openai",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("x-ratelimit-limit-requests: 1"), "{stdout}");
    assert!(stdout.contains("retry-after: 60"), "{stdout}");
    let bad = sluicegate(&["replay", &path, "--set", "requests_per_hour=5"]);
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("unknown parameter"));
}

#[test]
fn the_demo_tells_the_seeds_stories() {
    let out = sluicegate(&["demo"]);
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    let two_hours = stdout.lines().find(|l| l.trim_start().starts_with("2 h")).unwrap_or_default();
    assert_eq!(two_hours.split_whitespace().nth(2), Some("1440"), "{stdout}");
    assert!(stdout.contains("60 admitted, 60 admitted over-limit"), "{stdout}");
    assert!(stdout.contains("HTTP 503") && stdout.contains("HTTP 429"), "{stdout}");
}
