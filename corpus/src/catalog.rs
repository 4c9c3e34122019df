//! The list of corpus programs and version pairs.

use std::path::PathBuf;

/// A language or runtime feature a corpus program exercises, so tests can
/// pick programs by what they contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Feature {
    /// Functions with 0 to 8 integer parameters; the 7th and 8th are passed on
    /// the stack, including `char`/`short` ones.
    IntParams0To8,
    /// `float`/`double` parameters and return values.
    FloatParams,
    /// Structs of at most 16 bytes passed and returned by value (registers).
    SmallStructByValue,
    /// Structs over 16 bytes passed and returned by value (memory).
    LargeStructByValue,
    /// Variadic functions reading ints and doubles.
    Varargs,
    /// Nested blocks whose locals shadow outer ones.
    ShadowedLocals,
    /// `static` variables inside functions.
    StaticLocals,
    /// Variable-length arrays on the stack.
    Vla,
    /// for / while / do-while / nested loops with break and continue.
    Loops,
    /// A loop made of `goto`.
    GotoLoop,
    /// A dense `switch` that compiles to a jump table.
    JumpTable,
    /// Recursive functions.
    Recursion,
    /// Recursion thousands of frames deep.
    DeepRecursion,
    /// Function pointers stored in structs.
    FnPtrInStruct,
    /// Comparator callbacks passed to `qsort`/`bsearch`.
    QsortCallback,
    /// Expressions whose partial results gcc keeps in callee-saved registers
    /// across calls (`f() + g() * h(x)`, `fib(n-1) + fib(n-2)`, ...).
    CalleeSavedTemps,
    /// POSIX threads.
    Threads,
    /// Mutexes.
    Mutex,
    /// Condition variables.
    CondVar,
    /// `fork` and `waitpid`.
    Fork,
    /// Blocking `read` on a pipe fed by another thread or process.
    PipeRead,
    /// TCP on 127.0.0.1: accept, connect, recv.
    TcpSocket,
    /// `nanosleep`.
    Nanosleep,
    /// Signal handlers installed with `sigaction`.
    Signals,
    /// Writes to standard error.
    Stderr,
}

impl Feature {
    /// Every feature.
    pub const ALL: [Feature; 25] = [
        Feature::IntParams0To8,
        Feature::FloatParams,
        Feature::SmallStructByValue,
        Feature::LargeStructByValue,
        Feature::Varargs,
        Feature::ShadowedLocals,
        Feature::StaticLocals,
        Feature::Vla,
        Feature::Loops,
        Feature::GotoLoop,
        Feature::JumpTable,
        Feature::Recursion,
        Feature::DeepRecursion,
        Feature::FnPtrInStruct,
        Feature::QsortCallback,
        Feature::CalleeSavedTemps,
        Feature::Threads,
        Feature::Mutex,
        Feature::CondVar,
        Feature::Fork,
        Feature::PipeRead,
        Feature::TcpSocket,
        Feature::Nanosleep,
        Feature::Signals,
        Feature::Stderr,
    ];

    /// Text that any source using the feature must contain, compared
    /// case-insensitively (a cheap sanity check of the tags), if there is one.
    pub fn source_marker(self) -> Option<&'static str> {
        Some(match self {
            Feature::Varargs => "va_arg(",
            Feature::StaticLocals => "    static ",
            Feature::Vla => "[n",
            Feature::GotoLoop => "goto ",
            Feature::JumpTable => "switch (",
            Feature::FnPtrInStruct => "(*",
            Feature::QsortCallback => "qsort(",
            Feature::Threads => "pthread_create(",
            Feature::Mutex => "pthread_mutex_lock(",
            Feature::CondVar => "pthread_cond_wait(",
            Feature::Fork => "fork()",
            Feature::PipeRead => "pipe(",
            Feature::TcpSocket => "accept(",
            Feature::Nanosleep => "nanosleep(",
            Feature::Signals => "sigaction(",
            Feature::Stderr => "stderr",
            _ => return None,
        })
    }
}

/// One C program of the corpus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    /// Unique name; also the cached binary's file name.
    pub name: &'static str,
    /// Absolute path of the `.c` file.
    pub source: PathBuf,
    /// Same stdout, stderr and exit status on every run (with [`Program::args`]).
    pub deterministic: bool,
    /// Exit code of a normal run (with [`Program::args`]).
    pub expected_exit: i32,
    /// Arguments for a normal, self-terminating run.
    pub args: &'static [&'static str],
    /// What the program exercises.
    pub features: &'static [Feature],
    /// More `.c` files compiled and linked with `source` (a program made of
    /// several compilation units), in order.
    pub extra_sources: Vec<PathBuf>,
}

impl Program {
    /// Whether the program is tagged with `feature`.
    pub fn has(&self, feature: Feature) -> bool {
        self.features.contains(&feature)
    }
}

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Spec {
    name: &'static str,
    expected_exit: i32,
    features: &'static [Feature],
}

use Feature::*;

const PROGRAMS: &[Spec] = &[
    Spec {
        name: "bank",
        expected_exit: 3,
        features: &[Threads, Mutex, CondVar, Loops, Stderr],
    },
    Spec {
        name: "calc",
        expected_exit: 0,
        features: &[
            JumpTable,
            SmallStructByValue,
            Recursion,
            StaticLocals,
            Loops,
        ],
    },
    Spec {
        name: "checksums",
        expected_exit: 0,
        features: &[Loops, GotoLoop, StaticLocals],
    },
    Spec {
        // Shapes of real servers' code (computed goto, a switch without
        // bounds check, noreturn calls with stack arguments, a 128-byte
        // frame): see the file's comment.
        name: "dispatch",
        expected_exit: 0,
        features: &[JumpTable, GotoLoop, Loops, IntParams0To8, Stderr],
    },
    Spec {
        name: "deeprec",
        expected_exit: 0,
        features: &[
            Recursion,
            DeepRecursion,
            SmallStructByValue,
            CalleeSavedTemps,
        ],
    },
    Spec {
        name: "echo_tcp",
        expected_exit: 0,
        features: &[TcpSocket, Threads, Loops],
    },
    Spec {
        name: "geometry",
        expected_exit: 0,
        features: &[FloatParams, SmallStructByValue, LargeStructByValue],
    },
    Spec {
        name: "inventory",
        expected_exit: 0,
        features: &[
            LargeStructByValue,
            SmallStructByValue,
            QsortCallback,
            FnPtrInStruct,
            FloatParams,
        ],
    },
    Spec {
        name: "jobrunner",
        expected_exit: 0,
        features: &[Fork, PipeRead, FnPtrInStruct, Loops],
    },
    Spec {
        name: "kvstore",
        expected_exit: 0,
        features: &[StaticLocals, ShadowedLocals, Loops],
    },
    Spec {
        name: "logstats",
        expected_exit: 0,
        features: &[Varargs, FloatParams, Stderr],
    },
    Spec {
        name: "matrix",
        expected_exit: 0,
        features: &[Vla, FloatParams, Recursion, Loops],
    },
    Spec {
        name: "packets",
        expected_exit: 0,
        features: &[IntParams0To8, FloatParams],
    },
    Spec {
        name: "pipeline",
        expected_exit: 0,
        features: &[Threads, PipeRead, Nanosleep, StaticLocals],
    },
    Spec {
        name: "prodcons",
        expected_exit: 0,
        features: &[Threads, Mutex, CondVar],
    },
    Spec {
        name: "ringbuf",
        expected_exit: 0,
        features: &[
            SmallStructByValue,
            GotoLoop,
            Loops,
            StaticLocals,
            FloatParams,
        ],
    },
    Spec {
        name: "scoring",
        expected_exit: 0,
        features: &[CalleeSavedTemps, Recursion],
    },
    Spec {
        name: "signals",
        expected_exit: 0,
        features: &[Signals, StaticLocals, Stderr],
    },
    Spec {
        name: "stackvm",
        expected_exit: 7,
        features: &[JumpTable, Loops],
    },
    Spec {
        name: "textstats",
        expected_exit: 0,
        features: &[Vla, ShadowedLocals, StaticLocals, Loops, GotoLoop],
    },
    Spec {
        name: "vending",
        expected_exit: 0,
        features: &[FnPtrInStruct, JumpTable, GotoLoop],
    },
];

/// The deterministic corpus programs (`corpus/programs/*.c`).
pub fn programs() -> Vec<Program> {
    let dir = corpus_dir().join("programs");
    PROGRAMS
        .iter()
        .map(|s| Program {
            name: s.name,
            source: dir.join(format!("{}.c", s.name)),
            deterministic: true,
            expected_exit: s.expected_exit,
            args: &[],
            features: s.features,
            extra_sources: Vec::new(),
        })
        .collect()
}

/// The corpus program called `name`, if there is one.
pub fn program(name: &str) -> Option<Program> {
    programs().into_iter().find(|p| p.name == name)
}

/// How a test talks to a long-running version-pair program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Prints progress lines; a line `quit` on stdin makes it finish cleanly
    /// (end-of-file on stdin is ignored). `argv[1]`, if given, bounds the
    /// number of ticks.
    Stdin,
    /// A TCP server: first prints `vN listening port=P`; a client line `quit`
    /// makes it answer and exit. `argv[1]`, if given, bounds the number of
    /// connections served.
    Tcp,
    /// A forking TCP server: first prints `vN listening port=P`; its
    /// connections are served by child processes. It runs until its process
    /// group is killed.
    Forking,
    /// Runs exactly `argv[1]` ticks (and sleeps `argv[2]` ms after each,
    /// default none), prints one line per tick and a last line `vN done ...`,
    /// exits 0. Stdin is not read; the output is a function of the
    /// arguments alone, so an update at the k-th update-point hit of a run
    /// can be checked line by line.
    Ticks,
}

/// A program in two versions for cross-version update tests.
///
/// Every progress line a version prints starts with its marker (`"v1 "` or
/// `"v2 "`), so a test can tell which code produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionPair {
    /// Name (`corpus/versions/<name>/`).
    pub name: &'static str,
    /// What changes between the versions and what that exercises.
    pub description: &'static str,
    /// How to drive and stop it.
    pub control: Control,
    /// Version 1.
    pub v1: Program,
    /// Version 2.
    pub v2: Program,
}

impl VersionPair {
    /// Line prefix printed by version `n` (1 or 2).
    pub fn marker(n: u32) -> String {
        format!("v{n} ")
    }
}

struct PairSpec {
    name: &'static str,
    /// Program names (cache file names) of v1 and v2.
    names: [&'static str; 2],
    description: &'static str,
    control: Control,
    short_args: &'static [&'static str],
    features: &'static [Feature],
}

const PAIRS: &[PairSpec] = &[
    PairSpec {
        name: "loop_body",
        names: ["loop_body.v1", "loop_body.v2"],
        description: "a long-running loop in main whose body changes: v2 uses a new constant \
                      in the running sum and prints `total=` instead of `sum=`",
        control: Control::Stdin,
        short_args: &["5"],
        features: &[Loops, Nanosleep],
    },
    PairSpec {
        name: "deep_frames",
        names: ["deep_frames.v1", "deep_frames.v2"],
        description: "deep recursion (200 frames of `descend`) idling at the bottom; v2's \
                      `descend` gains locals (every frame's layout changes) and adds them \
                      into the result after the recursive call returns",
        control: Control::Stdin,
        short_args: &["3"],
        features: &[Recursion, DeepRecursion, Nanosleep],
    },
    PairSpec {
        name: "main_changes",
        names: ["main_changes.v1", "main_changes.v2"],
        description: "main itself changes: v2 has a new local in main and a changed loop \
                      (different step and accumulator)",
        control: Control::Stdin,
        short_args: &["5"],
        features: &[Loops, Nanosleep],
    },
    PairSpec {
        name: "echo_server",
        names: ["echo_server.v1", "echo_server.v2"],
        description: "an idle single-threaded TCP echo server (blocked in accept/recv); \
                      v2 changes the reply format",
        control: Control::Tcp,
        short_args: &["0"],
        features: &[TcpSocket],
    },
    PairSpec {
        name: "threads8",
        names: ["threads8.v1", "threads8.v2"],
        description: "8 worker threads (2 hot loops, a mutex waiter and the lock holder in \
                      nanosleep, a blocked pipe read, a nanosleep ticker, a condition \
                      variable waiter, a timed condition wait); v2 changes `worker_step`",
        control: Control::Stdin,
        short_args: &["4"],
        features: &[Threads, Mutex, CondVar, PipeRead, Nanosleep, Loops],
    },
    PairSpec {
        name: "pool",
        names: ["pool.v1", "pool.v2"],
        description: "worker pool: 8 workers and 2 producers on condition variables around a \
                      bounded queue of numbered jobs, driven from stdin (`go N`, `wait`, `quit`); \
                      v2 changes the job's value and every line's version",
        control: Control::Stdin,
        short_args: &[],
        features: &[Threads, Mutex, CondVar, Nanosleep, Loops],
    },
    PairSpec {
        name: "waiters",
        names: ["waiters.v1", "waiters.v2"],
        description: "6 threads each on its own mutex and condition variable, all waiting at one \
                      call site (like redis's background threads), driven from stdin (`kick I`, \
                      `quit`); a wait that returns non-zero ends the program; v2 changes every \
                      line's version",
        control: Control::Stdin,
        short_args: &[],
        features: &[Threads, Mutex, CondVar, Loops],
    },
    PairSpec {
        name: "struct_insert",
        names: ["struct_insert.v1", "struct_insert.v2"],
        description: "a global struct gains a member mid-struct (NEW's initializer); the members after it move",
        control: Control::Ticks,
        short_args: &["6"],
        features: &[],
    },
    PairSpec {
        name: "struct_reorder",
        names: ["struct_reorder.v1", "struct_reorder.v2"],
        description: "a global struct loses two members and the other three are reordered",
        control: Control::Ticks,
        short_args: &["6"],
        features: &[],
    },
    PairSpec {
        name: "nested_array",
        names: ["nested_array.v1", "nested_array.v2"],
        description: "a global array of structs whose nested struct member widens short -> long (every element's stride changes)",
        control: Control::Ticks,
        short_args: &["6"],
        features: &[Loops],
    },
    PairSpec {
        name: "array_grew",
        names: ["array_grew.v1", "array_grew.v2"],
        description: "a written global int array grows from 4 to 7 elements: the prefix is kept, the rest is NEW's initializer",
        control: Control::Ticks,
        short_args: &["6"],
        features: &[],
    },
    PairSpec {
        name: "int_widen",
        names: ["int_widen.v1", "int_widen.v2"],
        description: "int -> long holding negative values: two globals and a local of main's running loop",
        control: Control::Ticks,
        short_args: &["6"],
        features: &[],
    },
    PairSpec {
        name: "narrow_fits",
        names: ["narrow_fits.v1", "narrow_fits.v2"],
        description: "long -> short where every value fits (a global and a global struct's members)",
        control: Control::Ticks,
        short_args: &["6"],
        features: &[],
    },
    PairSpec {
        name: "narrow_overflow",
        names: ["narrow_overflow.v1", "narrow_overflow.v2"],
        description: "long -> short where the value (70000 + n) never fits: the update is refused, the process goes on as v1",
        control: Control::Ticks,
        short_args: &["6"],
        features: &[],
    },
    PairSpec {
        name: "enum_renumber",
        names: ["enum_renumber.v1", "enum_renumber.v2"],
        description: "an enum renumbered and reordered (and gaining an enumerator): values map by enumerator name, in globals and in frames",
        control: Control::Ticks,
        short_args: &["6"],
        features: &[],
    },
    PairSpec {
        name: "threads4_local",
        names: ["threads4_local.v1", "threads4_local.v2"],
        description: "the same struct local alive in the frames of 4 threads gains a member and widens another",
        control: Control::Ticks,
        short_args: &["6"],
        features: &[Threads, Nanosleep, Loops],
    },
    PairSpec {
        name: "pointer_to_changed",
        names: ["pointer_to_changed.v1", "pointer_to_changed.v2"],
        description: "a global pointer to a global struct that gains members: it must point at the converted struct",
        control: Control::Ticks,
        short_args: &["6"],
        features: &[],
    },
    PairSpec {
        name: "main_struct_spec",
        names: ["main_struct_spec.v1", "main_struct_spec.v2"],
        description: "a struct local of main's running loop gains a member whose value the user gives in a SPEC (no default: needs SPEC support)",
        control: Control::Ticks,
        short_args: &["6"],
        features: &[Loops],
    },
    PairSpec {
        name: "fn_rename",
        names: ["fn_rename.v1", "fn_rename.v2"],
        description: "a function with a running loop is renamed (needs a SPEC continuation mapping)",
        control: Control::Ticks,
        short_args: &["6"],
        features: &[Loops],
    },
    PairSpec {
        name: "xform_member",
        names: ["xform_member.v1", "xform_member.v2"],
        description: "a struct gains a member that C transformers compute from the old members, for a global and for a local of main's running loop (SPEC.toml, transform.c; SPEC_crash.toml: a transformer that segfaults)",
        control: Control::Ticks,
        short_args: &["6"],
        features: &[Loops],
    },
    PairSpec {
        name: "txn_safety",
        names: ["txn_safety.v1", "txn_safety.v2"],
        description: "transfer() must not be active during the update (needs a SPEC transaction-safety constraint)",
        control: Control::Ticks,
        short_args: &["6"],
        features: &[Loops],
    },
    PairSpec {
        name: "callback_other_file",
        names: ["callback_other_file.v1", "callback_other_file.v2"],
        description: "a heap struct holding a callback, defined in another compilation unit \
                      (v1_table.c) than the one holding the pointer to it (`struct table;`)",
        control: Control::Ticks,
        short_args: &["6"],
        features: &[FnPtrInStruct],
    },
    PairSpec {
        name: "callback_void_ptr",
        names: ["callback_void_ptr.v1", "callback_void_ptr.v2"],
        description: "a callback kept only as raw bytes in a heap block reached through a \
                      `void *` (found by the sweep, not by the typed walk)",
        control: Control::Ticks,
        short_args: &["6"],
        features: &[],
    },
    PairSpec {
        name: "heap_list",
        names: ["heap_list.v1", "heap_list.v2"],
        description: "a linked list on the heap whose node gains a member in its padding: \
                      every node converted in place",
        control: Control::Ticks,
        short_args: &["6"],
        features: &[Loops, Recursion],
    },
    PairSpec {
        name: "heap_tree",
        names: ["heap_tree.v1", "heap_tree.v2"],
        description: "a search tree on the heap with parent pointers whose node outgrows its \
                      block: every node moved, every link and parent redirected",
        control: Control::Ticks,
        short_args: &["6"],
        features: &[Loops, Recursion],
    },
    PairSpec {
        name: "heap_shared",
        names: ["heap_shared.v1", "heap_shared.v2"],
        description: "a heap object pointed to from a global, frames, itself and another heap \
                      object (one pointer into its interior) outgrows its block and moves",
        control: Control::Ticks,
        short_args: &["6"],
        features: &[],
    },
    PairSpec {
        name: "chroot_sessions",
        names: ["chroot_sessions.v1", "chroot_sessions.v2"],
        description: "a fork-per-connection server whose sessions chroot into an empty \
                      directory (argv[1]) and become nobody before serving; v2 changes the \
                      reply format",
        control: Control::Forking,
        short_args: &[],
        features: &[Fork, TcpSocket],
    },
    PairSpec {
        name: "prefork_server",
        names: ["prefork_server.v1", "prefork_server.v2"],
        description: "a pre-forking server: the parent in waitpid, argv[1] workers (default 4) \
                      in accept or recv on one listening socket; v2 changes the reply format \
                      and the parent's report",
        control: Control::Forking,
        short_args: &[],
        features: &[Fork, TcpSocket],
    },
    PairSpec {
        name: "heap_array",
        names: ["heap_array.v1", "heap_array.v2"],
        description: "an array of structs in one heap block, its count in a global the SPEC \
                      names ([heap]); the struct grows: the whole block moves, an interior \
                      pointer to an element follows it",
        control: Control::Ticks,
        short_args: &["6"],
        features: &[Loops],
    },
    PairSpec {
        name: "heap_hash",
        names: ["heap_hash.v1", "heap_hash.v2"],
        description: "a hash table on the heap: a heap array of bucket heads (count: a member \
                      of the table, named by the SPEC) of chained entries whose struct grows: \
                      every entry of every bucket moves",
        control: Control::Ticks,
        short_args: &["6"],
        features: &[Loops],
    },
    PairSpec {
        name: "heap_locals",
        names: ["heap_locals.v1", "heap_locals.v2"],
        description: "heap arrays held only by locals: every frame of a recursive function \
                      holds its own block and its count (locals the SPEC names, [heap]); the \
                      struct grows: each frame's block moves whole",
        control: Control::Ticks,
        short_args: &["6"],
        features: &[Loops, Recursion],
    },
];

/// The version pairs (`corpus/versions/<name>/v1.c` and `v2.c`).
///
/// Each runs until told to stop (see [`Control`]); [`Program::args`] holds
/// arguments that make it stop by itself soon. Their output is not
/// deterministic in general (timing, ports), so `deterministic` is false.
pub fn version_pairs() -> Vec<VersionPair> {
    let dir = corpus_dir().join("versions");
    PAIRS
        .iter()
        .map(|p| {
            let version = |n: usize| Program {
                name: p.names[n - 1],
                source: dir.join(p.name).join(format!("v{n}.c")),
                deterministic: false,
                expected_exit: 0,
                args: p.short_args,
                features: p.features,
                extra_sources: extra_sources(&dir.join(p.name), n),
            };
            VersionPair {
                name: p.name,
                description: p.description,
                control: p.control,
                v1: version(1),
                v2: version(2),
            }
        })
        .collect()
}

/// The other compilation units of version `n` of a pair in `dir`: its files
/// `v{n}_*.c`, sorted by name (`v1.c` holds `main`, `v1_table.c` a module
/// linked with it).
fn extra_sources(dir: &std::path::Path, n: usize) -> Vec<PathBuf> {
    let prefix = format!("v{n}_");
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "c")
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix))
        })
        .collect();
    out.sort();
    out
}

/// The version pair called `name`, if there is one.
pub fn version_pair(name: &str) -> Option<VersionPair> {
    version_pairs().into_iter().find(|p| p.name == name)
}
