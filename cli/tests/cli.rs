//! The `sluicegate` binary, run as a user would.

use std::process::Output;

mod common;

use common::{HEADER, sluicegate, text, trace_file};

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
    for line in stdout.lines().skip(2).take_while(|l| !l.is_empty()) {
        let v: Vec<u64> = line.split_whitespace().take(8).map(|x| x.parse().unwrap()).collect();
        let [_, demanded, admitted, over, limited, shed, spend, invalid] = v[..] else { panic!("{line}") };
        assert_eq!(admitted + over + limited + shed + spend + invalid, demanded, "{line}");
        checked += demanded;
    }
    assert_eq!(checked, 3_000);
    // The summary's shares add up to the whole, and the 429s' bindings to the 429s.
    let summary = |label: &str| -> u64 {
        let line =
            stdout.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("{label}: {stdout}"));
        line.split_whitespace().find_map(|t| t.parse().ok()).unwrap()
    };
    let fates =
        ["admitted (in limit)", "over limit", "rate limited (429)", "shed (503)", "spend refused", "invalid"];
    assert_eq!(fates.iter().map(|f| summary(f)).sum::<u64>(), 3_000, "{stdout}");
    assert_eq!(summary("invalid (400)"), 31, "{stdout}"); // n = 0 on every 97th row
    let bindings = [
        "  bound by requests",
        "  bound by prompt_tokens",
        "  bound by uncached",
        "  bound by generated",
        "  bound by concurrency",
    ];
    assert_eq!(bindings.iter().map(|b| summary(b)).sum::<u64>(), summary("rate limited (429)"), "{stdout}");
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
    assert!(stdout.contains("60 admitted in limit, 60 over limit"), "{stdout}");
    assert!(stdout.contains("HTTP 503") && stdout.contains("HTTP 429"), "{stdout}");
    // Six classes of request: at 0.7 the two flex classes are shed, at 1.0 all but in-limit priority.
    let at = |load: &str| -> Vec<String> {
        let line = stdout.lines().find(|l| l.trim_start().starts_with(load)).unwrap_or_default();
        line.split("  ").map(str::trim).filter(|c| !c.is_empty()).skip(1).map(String::from).collect()
    };
    let shed = |n: usize| -> Vec<String> {
        (0..6).map(|i| if i < n { "503 shed" } else { "runs" }.to_string()).collect()
    };
    assert_eq!(at("0.5x"), shed(0), "{stdout}");
    assert_eq!(at("0.7x"), shed(2), "{stdout}");
    assert_eq!(at("1.0x"), shed(5), "{stdout}");
    assert_eq!(at("1.2x"), shed(6), "{stdout}");
}

/// The `priority` column names a service tier: 0 and 1 as before, or flex, default, priority.
#[test]
fn the_priority_column_takes_service_tier_names() {
    let rows = [
        "0,a,m,regular,flex,1,10,0,5,5",
        "1,a,m,regular,priority,1,10,0,5,5",
        "2,b,m,regular,default,1,10,0,5,5",
        "3,b,m,regular,1,1,10,0,5,5",
        "4,b,m,regular,urgent,1,10,0,5,5",
    ];
    let out = sluicegate(&["replay", &trace_file("tiers.csv", &format!("{HEADER}{}\n", rows.join("\n")))]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("line 6: skipped: priority must be 0, 1, flex, default or priority"), "{stderr}");
    assert!(text(&out.stdout).contains("1 bad rows skipped"), "{}", text(&out.stdout));
}

/// Issue 22: a value out of range is an error naming its parameter (`max_wait=nan` and
/// `max_wait=-5` used to be a silent 0, `inf` an error that named none).
#[test]
fn out_of_range_values_are_errors_that_name_the_parameter() {
    let path = trace_file("one.csv", &format!("{HEADER}0,a,m,regular,0,1,10,0,5,5\n"));
    for value in ["inf", "nan", "-5", "-inf"] {
        let set = format!("max_wait={value}");
        let out = sluicegate(&["replay", &path, "--policy", "together", "--set", &set]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "--set {set} was accepted");
        assert!(stderr.contains("max_wait must be a finite number of seconds"), "--set {set}: {stderr}");
        assert!(out.stdout.is_empty(), "--set {set} replayed anyway");
    }
    for set in [
        "hard_factor=0.5",
        "tick=0",
        "permit_ttl=0.5",
        "requests_per_minute=nan",
        "generated_tokens_ceiling=0",
    ] {
        let out = sluicegate(&["replay", &path, "--set", set]);
        let name = set.split('=').next().unwrap_or_default();
        assert!(!out.status.success(), "--set {set} was accepted");
        assert!(text(&out.stderr).contains(&format!("{name} must be")), "--set {set}: {}", text(&out.stderr));
    }
    // Overrides are resolved together: a floor above its ceiling fails in either order.
    let errors: Vec<String> = [
        ["requests_ceiling=60", "requests_per_minute=100"],
        ["requests_per_minute=100", "requests_ceiling=60"],
    ]
    .iter()
    .map(|[a, b]| {
        let out = sluicegate(&["replay", &path, "--set", a, "--set", b]);
        assert!(!out.status.success(), "--set {a} --set {b} was accepted");
        text(&out.stderr)
    })
    .collect();
    assert_eq!(errors[0], errors[1]);
    assert!(errors[0].contains("requests"), "{}", errors[0]);
}

/// `requests` identical requests at one instant on one scope.
fn burst_trace(name: &str, requests: u64, prompt: u64, max_tokens: u64) -> String {
    let mut body = String::from(HEADER);
    for _ in 0..requests {
        body.push_str(&format!("0,acct,llama,regular,0,1,{prompt},0,{max_tokens},{}\n", max_tokens.min(100)));
    }
    trace_file(name, &body)
}

/// `off` (or `inf`) turns a metric off; the CSV shows it as "-" and the header line as "off".
#[test]
fn off_turns_a_metric_off_and_the_header_line_says_so() {
    let path = burst_trace("burst.csv", 200, 10, 10);
    // fireworks_2024: 60 at once, 60 more over the limit, then 429s.
    let rows = csv_rows(&sluicegate(&["replay", &path, "--csv", "-"]));
    assert_eq!(rows[0][1..6], [200, 60, 60, 80, 0]);
    for value in ["off", "inf"] {
        let set = format!("requests_per_minute={value}");
        let out = sluicegate(&["replay", &path, "--set", &set, "--csv", "-"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let rows = csv_rows(&out);
        assert_eq!(rows[0][1..6], [200, 200, 0, 0, 0], "--set {set}");
        assert_eq!(rows[0][6], u64::MAX, "--set {set}: limit_requests is \"-\"");
        assert_eq!(rows[0][7], 60_000, "--set {set}: the other limits stay");
        let table = text(&sluicegate(&["replay", &path, "--set", &set]).stdout);
        let header = table.lines().next().unwrap_or_default();
        assert!(
            header.ends_with(
                "under fireworks_2024: requests off, prompt_tokens 60000 to 2000000/min, \
                 uncached_prompt_tokens 60000 to 2000000/min, generated_tokens 6000 to 200000/min; \
                 hard_factor 2, max_wait 0 s"
            ),
            "{header}"
        );
    }
}

/// Issue 22: `--policy fixed --set requests_per_minute=300` enforces requests only. Each request
/// reserves 100,000 generated tokens, more than fixed's default 6,000 a minute allows: they used
/// to be refused on generated tokens, every one.
#[test]
fn fixed_with_one_limit_set_enforces_only_that_limit() {
    let path = burst_trace("huge.csv", 400, 1_000_000, 100_000);
    let args = ["replay", path.as_str(), "--policy", "fixed", "--set", "requests_per_minute=300"];
    let out = sluicegate(&[&args[..], &["--csv", "-"]].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows = csv_rows(&out);
    assert_eq!(rows[0][1..6], [400, 300, 0, 100, 0]);
    assert_eq!(rows[0][6..], [300, u64::MAX, u64::MAX, u64::MAX]);
    let out = sluicegate(&[&args[..], &["--headers", "openai"]].concat());
    let stdout = text(&out.stdout);
    let header = stdout.lines().next().unwrap_or_default();
    assert!(
        header.ends_with(
            "under fixed: requests 300/min, prompt_tokens off, uncached_prompt_tokens off, \
             generated_tokens off; hard_factor 1, max_wait 0 s"
        ),
        "{header}"
    );
    // The last refusal is on requests: its headers name no token limit.
    assert!(stdout.contains("x-ratelimit-limit-requests: 300"), "{stdout}");
    assert!(!stdout.contains("x-ratelimit-limit-tokens"), "{stdout}");
}

#[test]
fn dated_resets_read_in_the_traces_time_or_todays() {
    let azure: String = std::fs::read_to_string("../data/azure_llm_2023_conv.csv")
        .unwrap()
        .lines()
        .take(50)
        .map(|l| format!("{l}\n"))
        .collect();
    let path = trace_file("azure_head.csv", &azure);
    let args =
        ["replay", &path, "--policy", "fixed", "--set", "requests_per_minute=1", "--headers", "anthropic"];
    let out = sluicegate(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("anthropic-ratelimit-requests-reset: 2023-11-16T18:"), "{stdout}");
    // An undated trace reads in today's time: anything but 1970.
    let body = format!("{HEADER}0,a,m,regular,0,1,10,0,5,5\n10,a,m,regular,0,1,10,0,5,5\n");
    let path = trace_file("undated.csv", &body);
    let out = sluicegate(&[
        "replay",
        &path,
        "--policy",
        "fixed",
        "--set",
        "requests_per_minute=1",
        "--headers",
        "anthropic",
    ]);
    let stdout = text(&out.stdout);
    let reset =
        stdout.lines().find(|l| l.contains("anthropic-ratelimit-requests-reset: ")).unwrap_or_default();
    assert!(reset.contains(": 20") && !reset.contains("1970"), "{stdout}");
}

/// An adaptive limit pinned by its ceiling reads as one number; the smoothing wait in seconds.
#[test]
fn the_header_line_gives_a_pinned_limit_and_the_wait_as_set() {
    let path = trace_file("pinned.csv", &format!("{HEADER}0,a,m,regular,0,1,10,0,5,5\n"));
    let out = sluicegate(&["replay", &path, "--set", "requests_ceiling=60", "--set", "max_wait=2.5"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let first = text(&out.stdout).lines().next().unwrap_or_default().to_string();
    assert!(first.contains(": requests 60/min, prompt_tokens 60000 to 2000000/min"), "{first}");
    assert!(first.ends_with("hard_factor 2, max_wait 2.5 s"), "{first}");
}
