//! A small endless program whose every output line the test can check
//! from the source alone, in two versions: each round deposits 10 (v1) or
//! 11 (v2) into `accounts[round % 3]` and prints the balance, naming the
//! account through a pointer to a string literal of the first version's
//! read-only data (so that data must outlive its image).

/// The source of version `version` (1 or 2).
pub fn source(version: u32) -> String {
    let amount = 9 + version;
    format!(
        r#"
#include <stdio.h>
#include <time.h>
long accounts[3] = {{100, 250, 75}};
const char *label = "acct";
long deposit(int i, long amount) {{ accounts[i] += amount; return accounts[i]; }}
int main(void)
{{
    label = "account"; /* set by the running code: copied, not NEW's */
    for (int round = 0; round < 1000000; round++) {{
        long now = deposit(round % 3, {amount});
        printf("v{version} round %d: %s %d has %ld\n", round, label, round % 3, now);
        fflush(stdout);
        struct timespec ts = {{0, 2000000}};
        nanosleep(&ts, NULL);
    }}
    return 0;
}}
"#
    )
}

/// Checks every line: rounds in order from 0, account `round % 3`, its
/// balance the previous one plus the deposit of the version that printed
/// the line. Returns the number of lines of each version (v1, v2).
pub fn check_lines(stdout: &str) -> Result<(usize, usize), String> {
    let mut balances = [100i64, 250, 75];
    let mut counts = (0, 0);
    for (r, line) in stdout.lines().enumerate() {
        let version = match line.get(..3) {
            Some("v1 ") => 1,
            Some("v2 ") => 2,
            _ => return Err(format!("line {r}: {line:?}")),
        };
        let i = r % 3;
        balances[i] += 9 + version;
        let want = format!("v{version} round {r}: account {i} has {}", balances[i]);
        if line != want {
            return Err(format!("line {r}:\n got {line:?}\nwant {want:?}"));
        }
        if version == 1 {
            counts.0 += 1;
        } else {
            counts.1 += 1;
        }
    }
    Ok(counts)
}
