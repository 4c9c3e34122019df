# gdb-side half of the DWARF oracle test (gdb_oracle.rs).
#
# Runs the program under gdb, stops at every update point listed in the
# expectations file (addresses from upstare's tables), and at each stop reads
# every variable twice: through upstare's tables (CFA = rbp + 16, plus the
# table's CFA offset) and through gdb's own DWARF evaluation of the symbols in
# scope at that pc. Writes a JSON report of what matched and what did not.
#
# Invoked as: gdb -batch -nx -x gdb_oracle.py --args PROG ARGS...
# with UPSTARE_ORACLE_IN (expectations) and UPSTARE_ORACLE_OUT (report) set.

import json
import os

import gdb

MAX_HITS_PER_POINT = int(os.environ.get("UPSTARE_ORACLE_HITS", "3"))
MAX_STOPS = 2000

with open(os.environ["UPSTARE_ORACLE_IN"]) as f:
    spec = json.load(f)
points = {p["addr"]: p for p in spec["points"]}

gdb.execute("set pagination off")
gdb.execute("set confirm off")
gdb.execute("set disable-randomization on")
gdb.execute("set detach-on-fork on")
gdb.execute("set follow-fork-mode parent")
gdb.execute("set print thread-events off")
gdb.execute("set print inferior-events off")
for sig in ("SIGUSR1", "SIGUSR2", "SIGALRM", "SIGCHLD", "SIGPIPE", "SIGTERM",
            "SIGINT", "SIGHUP", "SIGQUIT", "SIGSEGV", "SIGFPE"):
    gdb.execute("handle %s nostop noprint pass" % sig, to_string=True)
gdb.execute("starti < /dev/null", to_string=True)

inferior = gdb.selected_inferior()
exe = os.path.realpath(gdb.current_progspace().filename)
bias = None
with open("/proc/%d/maps" % inferior.pid) as maps:
    for line in maps:
        fields = line.split()
        if len(fields) >= 6 and os.path.realpath(fields[5]) == exe and int(fields[2], 16) == 0:
            bias = int(fields[0].split("-")[0], 16)
            break
if bias is None:
    raise gdb.GdbError("cannot find the executable mapping of %s" % exe)
if not spec["pie"]:
    bias = 0

breakpoints = {}
for addr in points:
    bp = gdb.Breakpoint("*0x%x" % (bias + addr), internal=True)
    bp.silent = True
    breakpoints[addr] = bp

ulong = gdb.lookup_type("unsigned long")
report = {"stops": 0, "points_reached": [], "compared": 0, "statics_compared": 0,
          "skipped": [], "mismatches": []}
hits = {}


def as_int(value):
    return int(value.cast(ulong))


def gdb_symbols(frame):
    """Innermost-first visible locals and parameters of the frame's function."""
    seen = {}
    block = frame.block()
    while block is not None:
        for sym in block:
            if (sym.is_argument or sym.is_variable) and sym.name not in seen:
                seen[sym.name] = sym
        if block.function is not None:
            break
        block = block.superblock
    return seen


def ours_in_scope(point, name):
    """The innermost of our variables named `name` in scope (narrowest scope)."""
    cands = [v for v in point["vars"] if v["name"] == name]
    if not cands:
        return None
    return min(cands, key=lambda v: v["scope_len"])


def compare_at(point, frame):
    rbp = as_int(frame.read_register("rbp"))
    cfa = rbp + 16
    here = "%s@0x%x" % (point["function"], point["addr"])
    syms = gdb_symbols(frame)
    for name, sym in syms.items():
        ours = ours_in_scope(point, name)
        try:
            value = sym.value(frame)
        except gdb.error as e:
            report["skipped"].append("%s %s: gdb cannot read it (%s)" % (here, name, e))
            continue
        if sym.addr_class == gdb.SYMBOL_LOC_STATIC:
            if ours is None or ours["kind"] != "static":
                report["mismatches"].append("%s static %s: missing from the tables" % (here, name))
                continue
            if as_int(value.address) != bias + ours["offset"]:
                report["mismatches"].append("%s static %s: tables 0x%x, gdb 0x%x" % (
                    here, name, bias + ours["offset"], as_int(value.address)))
            report["statics_compared"] += 1
            continue
        if ours is None:
            report["mismatches"].append("%s %s: in scope for gdb, not in the tables" % (here, name))
            continue
        if ours["kind"] == "complex":
            report["skipped"].append("%s %s: %s" % (here, name, ours["detail"]))
            continue
        if value.address is None:
            report["skipped"].append("%s %s: gdb gives no address" % (here, name))
            continue
        gaddr = as_int(value.address)
        size = value.type.sizeof
        if ours["kind"] == "cfa":
            taddr = cfa + ours["offset"]
        else:  # indirect (VLA): the slot holds the data address
            slot = bytes(inferior.read_memory(cfa + ours["offset"], 8))
            taddr = int.from_bytes(slot, "little")
        if ours["size"] is not None and ours["size"] != size:
            report["mismatches"].append("%s %s: size tables %d, gdb %d" % (here, name, ours["size"], size))
        if taddr != gaddr:
            report["mismatches"].append("%s %s: address tables 0x%x, gdb 0x%x" % (here, name, taddr, gaddr))
            continue
        if size > 0:
            ours_bytes = bytes(inferior.read_memory(taddr, size))
            gdb_bytes = bytes(inferior.read_memory(gaddr, size))
            if ours_bytes != gdb_bytes:
                report["mismatches"].append("%s %s: value differs" % (here, name))
        if ours["decl_line"] and sym.line and ours["decl_line"] != sym.line:
            report["mismatches"].append("%s %s: declared on line %d (tables) vs %d (gdb)" % (
                here, name, ours["decl_line"], sym.line))
        report["compared"] += 1
    for v in point["vars"]:
        if v["name"] not in syms and v["kind"] != "complex":
            report["mismatches"].append("%s %s: in the tables' scope, not visible to gdb" % (here, v["name"]))


while report["stops"] < MAX_STOPS:
    try:
        gdb.execute("continue", to_string=True)
    except gdb.error:
        break  # the program has exited
    if not inferior.is_valid() or inferior.pid == 0:
        break
    try:
        frame = gdb.selected_frame()
    except gdb.error:
        break
    addr = frame.pc() - bias
    point = points.get(addr)
    if point is None:
        continue
    report["stops"] += 1
    hits[addr] = hits.get(addr, 0) + 1
    if hits[addr] == 1:
        report["points_reached"].append(addr)
    if hits[addr] >= MAX_HITS_PER_POINT:
        breakpoints[addr].enabled = False
    compare_at(point, frame)

with open(os.environ["UPSTARE_ORACLE_OUT"], "w") as f:
    json.dump(report, f)
gdb.execute("kill", to_string=True)
