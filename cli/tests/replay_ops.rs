//! `sluicegate replay` on the traces operators really have: many tenants, bad keys, gaps of
//! years, a reader that goes away, outputs that cannot be written, an overloaded backend, and
//! several policies to choose from.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

mod common;

use common::{HEADER, sluicegate, text, trace_file};

/// The first count on the summary line starting with `label`, under the first policy.
fn summary(stdout: &str, label: &str) -> u64 {
    let line = stdout.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("{label}: {stdout}"));
    line[label.len()..].split_whitespace().find_map(|t| t.parse().ok()).unwrap()
}

#[test]
fn tables_are_sized_from_the_trace_not_from_accounts() {
    // 1,200 accounts on 3 models: far more scopes than the default --accounts 1 would size for.
    let mut body = String::from(HEADER);
    for i in 0..3_600u64 {
        body.push_str(&format!("{},tenant-{},model-{},regular,0,1,100,0,10,10\n", i * 10, i % 1_200, i % 3));
    }
    let out = sluicegate(&["replay", &trace_file("tenants.csv", &body)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(summary(&stdout, "requests"), 3_600);
    assert_eq!(summary(&stdout, "admitted (in limit)"), 3_600, "{stdout}");
    assert_eq!(summary(&stdout, "invalid (400)"), 0, "{stdout}");
}

#[test]
fn a_row_the_engine_refuses_is_one_invalid_request_on_its_line() {
    let long = "a".repeat(65);
    let body = format!(
        "{HEADER}0,a,m,regular,0,1,10,0,5,5\n\n10,{long},m,regular,0,1,10,0,5,5\n20,a,m,regular,0,1,10,0,5,5\n"
    );
    let path = trace_file("long_key.csv", &body);
    let out = sluicegate(&["replay", &path]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    // Line 4: the header, a row and a blank line come first.
    assert!(stderr.contains("line 4: counted invalid: key longer than 64 bytes"), "{stderr}");
    let stdout = text(&out.stdout);
    assert_eq!(summary(&stdout, "requests"), 3, "{stdout}");
    assert_eq!(summary(&stdout, "admitted (in limit)"), 2, "{stdout}");
    assert_eq!(summary(&stdout, "invalid (400)"), 1, "{stdout}");
    let strict = sluicegate(&["replay", &path, "--strict"]);
    assert!(!strict.status.success());
    assert!(text(&strict.stderr).contains("line 4: key longer than 64 bytes"), "{}", text(&strict.stderr));
}

#[test]
fn a_gap_of_decades_between_rows_costs_nothing() {
    let body = format!("{HEADER}0,a,m,regular,0,1,10,0,5,5\n1700000000000,a,m,regular,0,1,10,0,5,5\n");
    let path = trace_file("gap.csv", &body);
    let out = sluicegate(&["replay", &path, "--csv", "-"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: Vec<String> = text(&out.stdout).lines().skip(1).map(String::from).collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows[0].starts_with("0,1,1,0,0,0,"), "{rows:?}");
    assert!(rows[1].starts_with("28333333,1,1,0,0,0,"), "{rows:?}");
    // Idle decades shrank the limit back to its floor.
    assert!(rows[1].ends_with(",60,60000,60000,6000"), "{rows:?}");
    let table = sluicegate(&["replay", &path]);
    assert!(text(&table.stdout).contains("idle for 28333332 minutes"), "{}", text(&table.stdout));
}

/// Starts `args` with its stdout a pipe whose reader reads `lines` lines and goes away.
fn reader_leaves_after(args: &[&str], lines: usize) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluicegate"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut reader = BufReader::new(stdout);
    for _ in 0..lines {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0);
    }
    drop(reader);
    child.wait_with_output().unwrap()
}

#[test]
fn a_reader_that_goes_away_ends_the_output_quietly() {
    // 3,000 minutes of table: more than a pipe holds, so the writer meets the closed pipe.
    let mut body = String::from(HEADER);
    for minute in 0..3_000u64 {
        body.push_str(&format!("{},a,m,regular,0,1,10,0,5,5\n", minute * 60_000));
    }
    let path = trace_file("long_table.csv", &body);
    for (args, lines) in [
        (vec!["replay", path.as_str()], 2),
        (vec!["replay", path.as_str(), "--csv", "-"], 2),
        (vec!["demo"], 0),
        (vec!["demo"], 1),
    ] {
        let out = reader_leaves_after(&args, lines);
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "{args:?}: {:?} {stderr}", out.status);
        assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{args:?}: {stderr}");
    }
}

#[test]
fn headers_are_rendered_as_the_policy_sends_them() {
    let body = format!("{HEADER}0,a,m,regular,0,1,1000,0,50,50\n");
    let path = trace_file("per_second.csv", &body);
    let out = sluicegate(&["replay", &path, "--policy", "fireworks_2026", "--headers", "fireworks"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    // fireworks_2026 publishes per-second limits: 3.6M prompt tokens a minute is 60,000 a second.
    assert!(stdout.contains("x-ratelimit-limit-tokens-prompt: 60000"), "{stdout}");
    assert!(stdout.contains("x-ratelimit-limit-tokens-cache-adjusted-prompt: 15000"), "{stdout}");
    let per_minute = sluicegate(&["replay", &path, "--policy", "fireworks_2024", "--headers", "fireworks"]);
    assert!(text(&per_minute.stdout).contains("x-ratelimit-limit-tokens-prompt: 60000\n"));
    assert!(!text(&per_minute.stdout).contains("cache-adjusted"));
}

#[test]
fn an_output_that_cannot_be_written_is_named_before_the_replay() {
    let trace = "../data/azure_llm_2023_conv.csv";
    for flag in ["--csv", "--plot"] {
        let path = "/nonexistent-dir/out.file";
        let out = sluicegate(&["replay", trace, flag, path]);
        assert!(!out.status.success(), "{flag}");
        let stderr = text(&out.stderr);
        assert!(stderr.contains(&format!("cannot write {path}")), "{flag}: {stderr}");
        assert!(out.stdout.is_empty(), "{flag}: the replay ran: {}", text(&out.stdout));
    }
}

#[test]
fn an_overloaded_backend_sheds_flex_first_and_priority_last() {
    // Three tenants, one per tier, sending 1.7 requests a second in all for 18 minutes at a
    // backend of 8 slots that finishes about 0.76 a second (10.5 s a request): overloaded 2.2×.
    let mut body = String::from(HEADER);
    for i in 0..1_800u64 {
        let tier = ["flex", "default", "priority"][(i % 3) as usize];
        body.push_str(&format!("{},{tier}-tenant,m,regular,{tier},1,100,0,100,100\n", i * 600));
    }
    let path = trace_file("overload.csv", &body);
    let base = ["replay", path.as_str(), "--policy", "fixed", "--set", "requests_per_minute=1000000"];
    let loaded = sluicegate(&[&base[..], &["--capacity", "8", "--tokens-per-second", "10"]].concat());
    assert!(loaded.status.success(), "{}", text(&loaded.stderr));
    let stdout = text(&loaded.stdout);
    let shed = summary(&stdout, "shed (503)");
    assert_eq!(summary(&stdout, "rate limited (429)"), 0, "{stdout}");
    let most = stdout.lines().find(|l| l.starts_with("Most refused accounts")).unwrap();
    let refused = |tenant: &str| -> u64 {
        most.find(tenant).map_or(0, |at| {
            let digits =
                most[at + tenant.len()..].split(|c: char| !c.is_ascii_digit()).find(|s| !s.is_empty());
            digits.unwrap().parse().unwrap()
        })
    };
    let (flex, default, priority) =
        (refused("flex-tenant "), refused("default-tenant "), refused("priority-tenant "));
    assert_eq!(flex + default + priority, shed);
    // Flex absorbs the overload first, the default tier the rest; priority rides through.
    assert!(flex >= 570 && (100..500).contains(&default) && priority <= 6, "{most}");
    // Without a backend nothing is loaded and nothing is shed.
    let unloaded = sluicegate(&base);
    assert_eq!(summary(&text(&unloaded.stdout), "shed (503)"), 0);
    let bad = sluicegate(&[&base[..], &["--capacity", "0"]].concat());
    assert!(!bad.status.success() && text(&bad.stderr).contains("--capacity"));
    let bad = sluicegate(&[&base[..], &["--capacity", "8", "--tokens-per-second", "0"]].concat());
    assert!(!bad.status.success() && text(&bad.stderr).contains("--tokens-per-second"));
}

#[test]
fn policies_are_compared_side_by_side() {
    let svg = format!("{}/compare.svg", env!("CARGO_TARGET_TMPDIR"));
    let policies = "fireworks_2024,together,fixed:requests_per_minute=200";
    let out =
        sluicegate(&["replay", "../data/azure_llm_2023_conv.csv", "--compare", policies, "--plot", &svg]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let heading = stdout.lines().find(|l| l.starts_with("policy")).unwrap();
    let names: Vec<&str> = heading.split_whitespace().skip(1).collect();
    assert_eq!(names, ["fireworks_2024", "together", "fixed:requests_per_minute=200"]);
    let requests = stdout.lines().find(|l| l.starts_with("requests")).unwrap();
    assert_eq!(requests.split_whitespace().skip(1).collect::<Vec<_>>(), ["19366"; 3]);
    // The fixed 200 a minute refuses what the trace's ~330 a minute exceeds, all bound by requests.
    let limited = stdout.lines().find(|l| l.starts_with("rate limited (429)")).unwrap();
    let fixed_429: u64 = limited.split_whitespace().filter_map(|t| t.parse().ok()).next_back().unwrap();
    let by_requests = stdout.lines().find(|l| l.starts_with("  bound by requests")).unwrap();
    let fixed_by_requests: u64 =
        by_requests.split_whitespace().filter_map(|t| t.parse().ok()).next_back().unwrap();
    assert!(fixed_429 > 1_000 && fixed_429 == fixed_by_requests, "{stdout}");
    let drawn = std::fs::read_to_string(&svg).unwrap();
    for name in names {
        assert!(drawn.contains(&format!("{name}: requests")), "{name}");
    }
    // The CSV of a comparison starts each row with its policy.
    let csv = sluicegate(&["replay", "../data/azure_llm_2023_conv.csv", "--compare", policies, "--csv", "-"]);
    let csv = text(&csv.stdout);
    assert!(csv.starts_with("policy,minute,demanded,admitted,over_limit,"), "{csv}");
    assert_eq!(csv.lines().filter(|l| l.starts_with("together,")).count(), 59);
    let unknown = sluicegate(&["replay", "../data/azure_llm_2023_conv.csv", "--compare", "fixed,sideways"]);
    assert!(!unknown.status.success() && text(&unknown.stderr).contains("unknown policy \"sideways\""));
}

#[test]
fn the_walk_through_in_docs_shows_what_the_replay_prints() {
    let doc = std::fs::read_to_string("../docs/replay.md").unwrap();
    let block = doc.split("```text\n").nth(1).and_then(|rest| rest.split("```").next()).unwrap();
    let out = sluicegate(&[
        "replay",
        "../data/azure_llm_2023_conv.csv",
        "--accounts",
        "8",
        "--accounts-zipf",
        "1",
        "--compare",
        "fireworks_2024,together,fixed:requests_per_minute=600",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let summary = &stdout[stdout.find("Summary (").unwrap()..];
    assert_eq!(summary, block, "docs/replay.md is out of date");
}

#[test]
fn an_account_at_its_in_flight_cap_gets_429s_bound_by_concurrency() {
    // 2 slots, 10 s a request, one request a second from one account capped at 3 in flight.
    let mut body = String::from(HEADER);
    for i in 0..120u64 {
        body.push_str(&format!("{},a,m,regular,priority,1,0,0,100,100\n", i * 1_000));
    }
    let path = trace_file("concurrency.csv", &body);
    let out = sluicegate(&[
        "replay",
        &path,
        "--policy",
        "fixed",
        "--set",
        "requests_per_minute=1000000",
        "--set",
        "max_in_flight=3",
        "--capacity",
        "2",
        "--tokens-per-second",
        "10",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let limited = summary(&stdout, "rate limited (429)");
    assert!(limited > 60, "{stdout}");
    assert_eq!(summary(&stdout, "  bound by concurrency"), limited, "{stdout}");
    assert_eq!(summary(&stdout, "  bound by requests"), 0, "{stdout}");
}

#[test]
fn twenty_bad_rows_are_listed_and_more_are_counted() {
    for (bad, more) in [(20, None), (21, Some("1 more rows skipped")), (25, Some("5 more rows skipped"))] {
        let mut body = String::from(HEADER);
        for i in 0..bad {
            body.push_str(&format!("{i},a,m,sideways,0,1,10,0,5,5\n"));
        }
        body.push_str("100,a,m,regular,0,1,10,0,5,5\n");
        let out = sluicegate(&["replay", &trace_file("many_bad.csv", &body)]);
        let stderr = text(&out.stderr);
        assert_eq!(stderr.lines().filter(|l| l.contains(": skipped: variant must be")).count(), 20.min(bad));
        assert_eq!(
            stderr.lines().find(|l| l.contains("more rows")).map(|l| l.rsplit(": ").next().unwrap()),
            more
        );
    }
}

#[test]
fn csv_to_stdout_writes_no_file_named_dash() {
    let dir = format!("{}/dash", env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&dir).unwrap();
    let _ = std::fs::remove_file(format!("{dir}/-"));
    let trace = trace_file("dash.csv", &format!("{HEADER}0,a,m,regular,0,1,10,0,5,5\n"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluicegate"))
        .args(["replay", &trace, "--csv", "-"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("minute,demanded,"));
    assert!(!std::path::Path::new(&format!("{dir}/-")).exists());
}

#[test]
fn a_priority_share_outside_zero_to_one_is_refused() {
    for share in ["1.5", "-0.1", "NaN"] {
        let out =
            sluicegate(&["replay", "../data/azure_llm_2023_conv.csv", &format!("--priority-share={share}")]);
        assert!(!out.status.success(), "{share}");
        assert!(text(&out.stderr).contains("--priority-share must be a fraction from 0 to 1"), "{share}");
        assert!(out.stdout.is_empty());
    }
}

/// Lying and absurd token counts: a max_tokens far below what is generated is charged at
/// settle until the account is refused; counts at u64::MAX are refused, never a crash.
#[test]
fn lying_and_absurd_token_counts_are_charged_or_refused() {
    let mut body = String::from(HEADER);
    for i in 0..600u64 {
        // Reserves 1 generated token, generates 5,000: fireworks_2024 allows 6,000 a minute.
        body.push_str(&format!("{},liar,m,regular,0,1,10,0,1,5000\n", i * 100));
    }
    body.push_str("60000,huge,m,regular,0,18446744073709551615,18446744073709551615,0,18446744073709551615,18446744073709551615\n");
    let path = trace_file("liars.csv", &body);
    let out = sluicegate(&["replay", &path]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(summary(&stdout, "requests"), 601, "{stdout}");
    // The overrun is charged: the liar's requests are refused on generated tokens.
    assert!(summary(&stdout, "  bound by generated_tokens") > 590, "{stdout}");
    assert!(stdout.contains("huge 1"), "{stdout}");
    // Behind a backend of 4 slots, each 100 s lie holds a slot: the rest is shed, none crash.
    let out = sluicegate(&["replay", &path, "--capacity", "4"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(summary(&stdout, "shed (503)") > 590, "{stdout}");
    assert!(stdout.contains("huge 1"), "{stdout}");
}

/// A week of traffic, one request every ten minutes: one row per minute that saw one, every
/// request admitted in limit, and the limits at their floors after idling between requests.
#[test]
fn a_week_of_sparse_traffic_replays_exactly() {
    let mut body = String::from(HEADER);
    for i in 0..(7 * 24 * 6u64) {
        body.push_str(&format!("{},a,m,regular,0,1,100,0,10,10\n", i * 600_000));
    }
    let out = sluicegate(&["replay", &trace_file("week.csv", &body), "--csv", "-"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let rows: Vec<&str> = stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 1_008);
    assert!(rows.iter().all(|r| r.ends_with(",1,1,0,0,0,60,60000,60000,6000")), "{stdout}");
    assert_eq!(rows.last().unwrap().split(',').next(), Some("10070"));
}
