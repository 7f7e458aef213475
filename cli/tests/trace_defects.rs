//! Defects in traces, through the `sluicegate` binary: a mistyped timestamp costs its own row
//! only, bad rows are reported on their real lines, and `--accounts-zipf` skews the spread.

mod common;

use common::{HEADER, sluicegate, text, trace_file};

/// 1,000 rows 100 ms apart on three accounts; the row at index 500 (line 502, the header is line
/// 1) has a timestamp from far in the future.
fn far_future_typo() -> String {
    let mut body = String::from(HEADER);
    for i in 0..1_000u64 {
        let t_ms = if i == 500 { 9_999_999_999 } else { i * 100 };
        body.push_str(&format!("{t_ms},acct-{},m,regular,0,1,100,0,10,10\n", i % 3));
    }
    trace_file("far_future_typo.csv", &body)
}

/// The lines stderr reports as skipped.
fn skipped(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.contains(": skipped: ")).collect()
}

#[test]
fn a_far_future_typo_costs_only_its_own_row() {
    let path = far_future_typo();
    let out = sluicegate(&["replay", &path]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    let skipped = skipped(&stderr);
    assert_eq!(skipped.len(), 1, "{stderr}");
    assert!(
        skipped[0].ends_with(
            "line 502: skipped: timestamp out of order (9999999999 ms, between rows at 49900 ms and 50100 ms)"
        ),
        "{stderr}"
    );
    let stdout = text(&out.stdout);
    assert!(stdout.contains("999 requests (sluicegate trace, 1 bad rows skipped)"), "{stdout}");

    let out = sluicegate(&["replay", &path, "--csv", "-"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let demanded: Vec<u64> =
        stdout.lines().skip(1).map(|l| l.split(',').nth(1).unwrap().parse().unwrap()).collect();
    // 100 s of trace: two minutes, not the 166,666 minutes to the typo.
    assert_eq!(demanded.len(), 2, "{stdout}");
    assert_eq!(demanded.iter().sum::<u64>(), 999, "{stdout}");
}

#[test]
fn strict_stops_at_the_far_future_typo() {
    let out = sluicegate(&["replay", &far_future_typo(), "--strict"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("line 502: timestamp out of order"), "{stderr}");
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
}

#[test]
fn bad_rows_are_reported_on_their_real_lines() {
    let row = "0,a,m,regular,0,1,10,0,5,5";
    for (name, end) in [("lines_lf.csv", "\n"), ("lines_crlf.csv", "\r\n")] {
        let lines = [
            HEADER.trim_end(), // 1
            row,               // 2
            "",                // 3
            "",                // 4
            // Line 5, its last field quoted over lines 5 to 7 (rows may have extra fields).
            "100,a,m,regular,0,1,10,0,5,5,\"a note",
            "over three",
            "lines\"",
            "",                             // 8
            "200,a,m",                      // 9: missing fields
            "50,a,m,regular,0,1,10,0,5,5",  // 10: out of order
            "300,a,m,regular,0,1,10,0,5,5", // 11
        ];
        let path = trace_file(name, &format!("{}{end}", lines.join(end)));
        let out = sluicegate(&["replay", &path]);
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        let stderr = text(&out.stderr);
        let skipped = skipped(&stderr);
        assert_eq!(skipped.len(), 2, "{name}: {stderr}");
        assert!(skipped[0].ends_with("line 9: skipped: missing field variant"), "{name}: {stderr}");
        assert!(skipped[1].contains("line 10: skipped: timestamp out of order"), "{name}: {stderr}");
        assert!(text(&out.stdout).contains("3 requests (sluicegate trace, 2 bad rows skipped)"), "{name}");
        let strict = sluicegate(&["replay", &path, "--strict"]);
        assert!(!strict.status.success());
        assert!(text(&strict.stderr).contains("line 9: missing field variant"), "{}", text(&strict.stderr));
    }
}

#[test]
fn accounts_zipf_must_be_a_number_at_least_zero() {
    for value in ["-1", "nan", "inf"] {
        let flag = format!("--accounts-zipf={value}");
        let out = sluicegate(&["replay", "../data/azure_llm_2023_conv.csv", "--accounts", "10", &flag]);
        assert!(!out.status.success(), "{flag} was accepted");
        let stderr = text(&out.stderr);
        assert!(stderr.contains("--accounts-zipf must be a number at least 0"), "{flag}: {stderr}");
        assert!(out.stdout.is_empty(), "{flag} replayed anyway");
    }
}

#[test]
fn accounts_zipf_puts_the_most_traffic_and_refusals_on_account_0() {
    // 30 requests a minute per account: the heavy head is refused most, in order.
    let args = ["replay", "../data/azure_llm_2023_conv.csv", "--accounts", "10", "--policy", "fixed"];
    let args = [&args[..], &["--set", "requests_per_minute=30"]].concat();
    let refused = |extra: &[&str]| -> Vec<(String, u64)> {
        let out = sluicegate(&[&args[..], extra].concat());
        assert!(out.status.success(), "{extra:?}: {}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert!(stdout.contains("19366 requests (azure trace, 0 bad rows skipped)"), "{extra:?}: {stdout}");
        let line = stdout.lines().find_map(|l| l.strip_prefix("Most refused accounts under fixed: "));
        let line = line.unwrap_or_else(|| panic!("{extra:?}: {stdout}"));
        line.split(", ")
            .map(|a| {
                let (name, n) = a.split_once(' ').unwrap();
                (name.to_string(), n.parse().unwrap())
            })
            .collect()
    };
    let skewed = refused(&["--accounts-zipf", "1.2"]);
    let names: Vec<&str> = skewed.iter().take(3).map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["acct-0", "acct-1", "acct-2"], "{skewed:?}");
    let all: u64 = skewed.iter().map(|(_, n)| n).sum();
    assert!(skewed[0].1 * 2 > all, "{skewed:?}");
    // Uniform, the refusals are spread: no account has half of them.
    let uniform = refused(&[]);
    let all: u64 = uniform.iter().map(|(_, n)| n).sum();
    assert!(uniform.iter().all(|(_, n)| n * 4 < all), "{uniform:?}");
    // A skew of 0 is the uniform spread, exactly.
    assert_eq!(refused(&["--accounts-zipf", "0"]), uniform);
}

/// Each model is a scope of its own: one account's 60 RPM floor holds per model.
#[test]
fn each_model_has_limits_of_its_own() {
    let mut body = String::from(HEADER);
    for i in 0..120u64 {
        body.push_str(&format!("{},acct,model-{},regular,0,1,10,0,5,5\n", i * 400, i % 2));
    }
    let out = sluicegate(&["replay", &trace_file("two_models.csv", &body), "--csv", "-"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let row: Vec<&str> = stdout.lines().nth(1).unwrap().split(',').collect();
    // demanded 120, all within the two scopes' limits, summed: 2 × 60 RPM.
    assert_eq!(row[1..7], ["120", "120", "0", "0", "0", "120"], "{stdout}");
}
