//! A generator of C programs of any size and varied shapes (loops, call
//! temporaries, switches, struct parameters, recursion), shared by the
//! rewrite benchmark and the generated-program tests.

use std::fmt::Write;

/// A program of `n` functions of varied shapes: loops, calls with call
/// temporaries, switches, struct parameters, many parameters.
pub fn generate(n: usize) -> String {
    let mut s = String::from(
        "#include <stdio.h>\nstruct pair { long a, b; };\nstruct big { long v[5]; };\nvolatile long sink;\n",
    );
    for i in 0..n {
        let _ = writeln!(s, "long f{i}(long x, int y, struct pair p);");
    }
    for i in 0..n {
        let callee = |k: usize| (i * 7 + k * 13 + 1) % n;
        match i % 5 {
            0 => {
                let _ = writeln!(
                    s,
                    "long f{i}(long x, int y, struct pair p) {{\n  long acc = p.a;\n  for (int k = 0; k < y; k++) {{\n    if (k == 3) continue;\n    acc += k * x;\n  }}\n  return acc + p.b;\n}}"
                );
            }
            1 => {
                let _ = writeln!(
                    s,
                    "long f{i}(long x, int y, struct pair p) {{\n  if (y <= 0) return x;\n  struct pair q = {{p.b, p.a}};\n  return f{}(x + 1, y - 1, q) + f{}(x, y - 2, p) * 2;\n}}",
                    callee(1),
                    callee(2)
                );
            }
            2 => {
                let _ = writeln!(
                    s,
                    "long f{i}(long x, int y, struct pair p) {{\n  long r = 0;\n  switch (y & 7) {{\n  case 0: r = x; break;\n  case 1: r = p.a; break;\n  case 2: r = p.b; break;\n  case 3: r = x * 3; break;\n  case 4: r = x - p.a; break;\n  case 5: r = -x; break;\n  default: r = 7;\n  }}\n  int n = 0;\n  while (n < 3) {{\n    sink = r + n;\n    n++;\n  }}\n  return r;\n}}"
                );
            }
            3 => {
                let _ = writeln!(
                    s,
                    "long f{i}(long x, int y, struct pair p) {{\n  char buf[64];\n  int len = snprintf(buf, sizeof buf, \"%ld-%d\", x, y);\n  long t = 0;\n  do {{\n    t += buf[--len];\n  }} while (len > 0);\n  return t + p.a;\n}}"
                );
            }
            _ => {
                let _ = writeln!(
                    s,
                    "long f{i}(long x, int y, struct pair p) {{\n  long v[8];\n  for (int k = 0; k < 8; k++) v[k] = x ^ k;\n  return v[y & 7] + (y > 0 ? f{}(x, y - 1, p) : 0);\n}}",
                    callee(3)
                );
            }
        }
    }
    let _ = writeln!(
        s,
        "int main(int argc, char **argv) {{\n  struct pair p = {{argc, 2}};\n  printf(\"%ld\\n\", f0(1, 3, p));\n  return 0;\n}}"
    );
    s
}
