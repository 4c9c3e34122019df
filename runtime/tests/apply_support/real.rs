//! Helpers for the real-server tests (`real_*.rs`): ports, the updater
//! run with `--json`, and which file a process runs.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use upstare_testkit::run_command;

/// A free port on 127.0.0.1 (bound, read and released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Runs `upstare-apply --pid PID --to NEW --json`: its exit code, JSON
/// report and whole output.
fn run_apply(pid: u32, new: &Path, wait: Duration) -> (Option<i32>, serde_json::Value, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_upstare-apply"));
    cmd.args(["--pid", &pid.to_string(), "--to"])
        .arg(new)
        .args(["--timeout", "10000", "--json"]);
    let out = run_command(cmd, wait).unwrap_or_else(|e| panic!("upstare-apply: {e}"));
    let text = format!("{}{}", out.stdout, out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("upstare-apply printed no JSON ({e}): {text}"));
    (out.status.code(), v, text)
}

/// Runs `upstare-apply --pid PID --to NEW --json` and returns its JSON
/// report (panics with its one-line error when it refuses).
pub fn update(pid: u32, new: &Path, wait: Duration) -> serde_json::Value {
    let (code, v, text) = run_apply(pid, new, wait);
    assert!(
        code == Some(0) && v["ok"] == serde_json::Value::Bool(true),
        "update refused: {text}"
    );
    v
}

/// Runs `upstare-apply --pid PID --to NEW --json`: its JSON report when the
/// update went through, its one-line error when it was refused (panics on
/// anything else: no JSON, or an exit code other than 0 or 1).
pub fn try_update(pid: u32, new: &Path, wait: Duration) -> Result<serde_json::Value, String> {
    let (code, v, text) = run_apply(pid, new, wait);
    match (code, v["ok"].as_bool()) {
        (Some(0), Some(true)) => Ok(v),
        (Some(1), Some(false)) => Err(v["error"].as_str().unwrap_or_default().to_string()),
        _ => panic!("upstare-apply neither updated nor refused: {text}"),
    }
}

/// Runs `upstare-apply --pid PID --to NEW --json`, which must refuse, and
/// returns its one-line error (panics when the update went through).
pub fn update_refused(pid: u32, new: &Path, wait: Duration) -> String {
    let (code, v, text) = run_apply(pid, new, wait);
    assert!(
        code == Some(1) && v["ok"] == serde_json::Value::Bool(false),
        "the update was not refused: {text}"
    );
    v["error"].as_str().unwrap_or_default().to_string()
}

/// The update latency the report gives, in milliseconds.
pub fn total_ms(report: &serde_json::Value) -> f64 {
    report["timings"]["total_us"].as_f64().unwrap_or(f64::NAN) / 1000.0
}

/// Panics unless `up`'s tables say its update points are armed by the
/// `--inline-points` flag byte, with every point detoured or kept for a
/// listed reason.
pub fn assert_inline_points(up: &Path) {
    let bytes = std::fs::read(up).unwrap_or_else(|e| panic!("{}: {e}", up.display()));
    let tables = upstare_dwarf::read_tables(&bytes).unwrap_or_else(|e| panic!("{e}"));
    match &tables.arming {
        upstare_dwarf::fdt::Arming::Inline(inline) => {
            assert!(
                !inline.detours.is_empty(),
                "{}: no update point detoured",
                up.display()
            );
        }
        upstare_dwarf::fdt::Arming::Int3 => {
            panic!("{}: tables say int3 arming", up.display())
        }
    }
}

/// Whether `exe` is mapped executable in process `pid`: by its path, or as
/// the memfd upstare hands a chrooted process (`/memfd:upstare:NAME`).
pub fn runs(pid: u32, exe: &Path) -> bool {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let canon = std::fs::canonicalize(exe).unwrap_or_else(|_| exe.to_path_buf());
    let memfd = format!(
        "/memfd:upstare:{}",
        exe.file_name()
            .map(|f| f.to_string_lossy())
            .unwrap_or_default()
    );
    maps.lines().any(|l| {
        l.contains(" r-xp ") && (l.ends_with(&*canon.to_string_lossy()) || l.contains(&memfd))
    })
}

/// A key-value server's client, one request at a time on one connection.
pub trait KvClient: Sized + Send + 'static {
    fn connect(addr: std::net::SocketAddr) -> std::io::Result<Self>;
    /// Stores `value` under `key`; an error unless the server says stored.
    fn set(&mut self, key: &str, value: &str) -> std::io::Result<()>;
    /// The value of `key`, or None when it is not stored.
    fn get(&mut self, key: &str) -> std::io::Result<Option<String>>;
}

/// Waits until a server answers a `get` on `addr` (bounded by `wait`).
pub fn wait_until_serving<C: KvClient>(addr: std::net::SocketAddr, wait: Duration) {
    let deadline = std::time::Instant::now() + wait;
    loop {
        if let Ok(mut c) = C::connect(addr) {
            if c.get("upstare-probe").is_ok() {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "server did not answer on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stores `n` keys `TAG<i>` = `value-TAG-<i>`.
pub fn store_keys<C: KvClient>(c: &mut C, n: usize, tag: &str) {
    for i in 0..n {
        c.set(&format!("{tag}{i}"), &format!("value-{tag}-{i}"))
            .unwrap_or_else(|e| panic!("set {tag}{i}: {e}"));
    }
}

/// Every key [`store_keys`] stored is there with its value.
pub fn check_keys<C: KvClient>(c: &mut C, n: usize, tag: &str, what: &str) {
    for i in 0..n {
        let v = c
            .get(&format!("{tag}{i}"))
            .unwrap_or_else(|e| panic!("{what}: get {tag}{i}: {e}"));
        assert_eq!(
            v.as_deref(),
            Some(format!("value-{tag}-{i}").as_str()),
            "{what}: key {tag}{i}"
        );
    }
}

/// Clients in a steady set+get loop on their own keys, each checking every
/// reply and timing the longest gap between two replies.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Result<(u64, Duration), String>>>,
}

impl Load {
    pub fn start<C: KvClient>(addr: std::net::SocketAddr, clients: usize, limit: Duration) -> Load {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..clients)
            .map(|k| {
                let stop = std::sync::Arc::clone(&stop);
                std::thread::spawn(move || -> Result<(u64, Duration), String> {
                    let mut c = C::connect(addr).map_err(|e| e.to_string())?;
                    let (mut n, mut worst) = (0u64, Duration::ZERO);
                    let mut last = std::time::Instant::now();
                    let deadline = last + limit;
                    while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                        let key = format!("load{k}-{}", n % 500);
                        let value = format!("{k}:{n}");
                        c.set(&key, &value).map_err(|e| format!("set {key}: {e}"))?;
                        let got = c.get(&key).map_err(|e| format!("get {key}: {e}"))?;
                        if got.as_deref() != Some(value.as_str()) {
                            return Err(format!(
                                "get {key}: {}, stored {value}",
                                got.unwrap_or_else(|| "nothing".into())
                            ));
                        }
                        worst = worst.max(last.elapsed());
                        last = std::time::Instant::now();
                        n += 1;
                    }
                    Ok((n, worst))
                })
            })
            .collect();
        Load { stop, threads }
    }

    /// Stops the clients; panics if one saw an error or made no request.
    /// Returns the longest gap any client saw.
    pub fn finish(self) -> Duration {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut worst = Duration::ZERO;
        for t in self.threads {
            let (n, w) = t
                .join()
                .expect("load thread")
                .unwrap_or_else(|e| panic!("a client saw an error: {e}"));
            assert!(n > 0, "a client made no request");
            worst = worst.max(w);
        }
        worst
    }
}

/// How long the key-value scenarios wait for the updater and the clients.
const KV_WAIT: Duration = Duration::from_secs(40);

/// A key-value server started by `start` from `exe` (its guard and address).
pub type StartKv<'a> = &'a dyn Fn(&Path) -> (upstare_testkit::ChildGuard, std::net::SocketAddr);

/// Identity update of an idle server to a fresh copy of `exe`: 200 keys
/// stored on a held connection are there on it and on a new one after, and
/// keys stored after the update are seen by the held connection.
pub fn kv_identity_idle<C: KvClient>(name: &str, exe: &Path, start: StartKv<'_>) {
    let dir = crate::apply_support::TempDir::new(&format!("real-{name}-idle"));
    let (child, addr) = start(exe);
    let mut held = C::connect(addr).expect("connect");
    store_keys(&mut held, 200, "idle");
    let copy = crate::apply_support::fresh_copy(exe, &dir, "identity");
    let report = update(child.pid(), &copy, KV_WAIT);
    assert!(runs(child.pid(), &copy), "the copy is not the running code");
    check_keys(&mut held, 200, "idle", "held connection after the update");
    let mut fresh = C::connect(addr).expect("connect after the update");
    check_keys(&mut fresh, 200, "idle", "new connection after the update");
    store_keys(&mut fresh, 10, "after");
    check_keys(&mut held, 10, "after", "held connection sees new keys");
    eprintln!(
        "{name} idle identity update: {:.2} ms, {} threads",
        total_ms(&report),
        report["threads"].as_array().map_or(0, Vec::len)
    );
}

/// Identity update while 2 clients keep a steady set+get load: no client
/// sees an error; prints the longest gap one saw.
pub fn kv_identity_under_load<C: KvClient>(name: &str, exe: &Path, start: StartKv<'_>) {
    let dir = crate::apply_support::TempDir::new(&format!("real-{name}-load"));
    let (child, addr) = start(exe);
    let load = Load::start::<C>(addr, 2, KV_WAIT);
    std::thread::sleep(Duration::from_millis(300));
    let copy = crate::apply_support::fresh_copy(exe, &dir, "identity");
    let report = update(child.pid(), &copy, KV_WAIT);
    std::thread::sleep(Duration::from_millis(300));
    let gap = load.finish();
    assert!(runs(child.pid(), &copy), "the copy is not the running code");
    eprintln!(
        "{name} identity update under load: {:.2} ms reported, longest client gap {:.2} ms",
        total_ms(&report),
        gap.as_secs_f64() * 1000.0
    );
}

/// Update of `old` to `new` (a security update) while a connection holds
/// 500 keys: it goes on, every key is there, new keys are seen.
pub fn kv_update_keeps_connection<C: KvClient>(
    name: &str,
    old: &Path,
    new: &Path,
    start: StartKv<'_>,
) {
    let (child, addr) = start(old);
    let mut held = C::connect(addr).expect("connect");
    store_keys(&mut held, 500, "sec");
    let report = update(child.pid(), new, KV_WAIT);
    assert!(runs(child.pid(), new), "the update is not the running code");
    check_keys(&mut held, 500, "sec", "held connection after the update");
    let mut fresh = C::connect(addr).expect("connect after the update");
    check_keys(&mut fresh, 500, "sec", "new connection after the update");
    store_keys(&mut fresh, 10, "post");
    check_keys(&mut held, 10, "post", "held connection sees new keys");
    eprintln!(
        "{name} {} -> {}: {:.2} ms reported, {} warnings",
        old.display(),
        new.display(),
        total_ms(&report),
        report["warnings"].as_array().map_or(0, Vec::len)
    );
}

/// The pids of the processes a process-tree update report lists, sorted.
pub fn updated_pids(report: &serde_json::Value) -> Vec<u32> {
    let mut pids: Vec<u32> = report["processes"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p["pid"].as_u64())
                .filter_map(|p| u32::try_from(p).ok())
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    pids
}

/// What a [`Pinger`] ends with: its session back, and the longest gap
/// and how many answers came (or the first error).
type Pinged<S> = (S, Result<(Duration, u64), String>);

/// A client session asked something in a loop (one request every 2 ms,
/// for at most `limit`) until stopped: the longest gap between two
/// answers and how many came.
pub struct Pinger<S> {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Pinged<S>>,
}

impl<S: Send + 'static> Pinger<S> {
    /// Starts asking: `ask(session, n)` sends the `n`-th request and
    /// checks its answer.
    pub fn start(
        mut session: S,
        limit: Duration,
        ask: fn(&mut S, u64) -> Result<(), String>,
    ) -> Pinger<S> {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let (mut worst, mut n) = (Duration::ZERO, 0u64);
            let mut last = std::time::Instant::now();
            let deadline = last + limit;
            while !flag.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                if let Err(e) = ask(&mut session, n) {
                    return (session, Err(e));
                }
                worst = worst.max(last.elapsed());
                last = std::time::Instant::now();
                n += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            (session, Ok((worst, n)))
        });
        Pinger { stop, thread }
    }

    /// Stops asking: the session and the longest gap; panics if an answer
    /// was wrong or none came.
    pub fn finish(self) -> (S, Duration) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (session, r) = self.thread.join().expect("pinger thread");
        let (worst, n) = r.unwrap_or_else(|e| panic!("the session stopped answering: {e}"));
        assert!(n > 0, "the session answered nothing while it was watched");
        (session, worst)
    }
}
