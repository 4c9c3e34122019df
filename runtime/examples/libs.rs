//! Lists the objects upstare's unwinder knows in a process (debug aid).
fn main() {
    let pid: i32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .expect("usage: libs PID");
    let pid = nix::unistd::Pid::from_raw(pid);
    let maps = upstare_runtime::target::procfs::read_maps(pid).expect("maps");
    let libs = upstare_runtime::load::libraries::Libraries::new(pid, &maps);
    for l in libs.iter() {
        println!("{} bias {:?}", l.name(), l.bias());
    }
}
