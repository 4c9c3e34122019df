//! Dominators (Cooper, Harvey and Kennedy's iterative algorithm) and natural
//! loops.

use super::cfg::Cfg;
use std::collections::BTreeSet;

/// Immediate dominators of the blocks reachable from block 0.
#[derive(Clone, Debug)]
pub(crate) struct Dominators {
    /// `idom[b]`: immediate dominator of `b` (`idom[0] == Some(0)`); `None`
    /// for unreachable blocks.
    pub idom: Vec<Option<usize>>,
    /// Reverse post-order of the reachable blocks.
    pub rpo: Vec<usize>,
}

impl Dominators {
    pub fn reachable(&self, b: usize) -> bool {
        self.idom[b].is_some()
    }
    /// Whether `a` dominates `b` (both reachable).
    pub fn dominates(&self, a: usize, b: usize) -> bool {
        if !self.reachable(a) || !self.reachable(b) {
            return false;
        }
        let mut x = b;
        // Bounded by the depth of the dominator tree.
        for _ in 0..=self.idom.len() {
            if x == a {
                return true;
            }
            match self.idom[x] {
                Some(p) if p != x => x = p,
                _ => return false,
            }
        }
        false
    }
}

/// Computes the dominator tree of `cfg`.
pub(crate) fn dominators(cfg: &Cfg) -> Dominators {
    let n = cfg.blocks.len();
    // Iterative DFS for the post-order.
    let mut post = Vec::with_capacity(n);
    let mut seen = vec![false; n];
    let mut stack: Vec<(usize, usize)> = vec![(0, 0)];
    seen[0] = true;
    while let Some(&mut (b, ref mut k)) = stack.last_mut() {
        if let Some(&s) = cfg.blocks[b].succs.get(*k) {
            *k += 1;
            if !seen[s] {
                seen[s] = true;
                stack.push((s, 0));
            }
        } else {
            post.push(b);
            stack.pop();
        }
    }
    let mut order = vec![usize::MAX; n];
    for (i, &b) in post.iter().enumerate() {
        order[b] = i;
    }
    let rpo: Vec<usize> = post.iter().rev().copied().collect();
    let mut idom: Vec<Option<usize>> = vec![None; n];
    idom[0] = Some(0);
    let intersect = |idom: &[Option<usize>], mut a: usize, mut b: usize| -> usize {
        while a != b {
            while order[a] < order[b] {
                a = idom[a].unwrap_or(0);
            }
            while order[b] < order[a] {
                b = idom[b].unwrap_or(0);
            }
        }
        a
    };
    let mut changed = true;
    while changed {
        changed = false;
        for &b in rpo.iter().skip(1) {
            let mut new: Option<usize> = None;
            for &p in &cfg.blocks[b].preds {
                if idom[p].is_none() {
                    continue;
                }
                new = Some(match new {
                    None => p,
                    Some(x) => intersect(&idom, p, x),
                });
            }
            if new.is_some() && idom[b] != new {
                idom[b] = new;
                changed = true;
            }
        }
    }
    Dominators { idom, rpo }
}

/// A natural loop: a header and every block of the loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Loop {
    pub header: usize,
    /// Sources of the back edges to the header.
    pub latches: Vec<usize>,
    pub blocks: BTreeSet<usize>,
}

/// Natural loops of `cfg`: one per header (back edges to the same header are
/// merged), sorted by the header's address.
pub(crate) fn natural_loops(cfg: &Cfg, dom: &Dominators) -> Vec<Loop> {
    let mut loops: Vec<Loop> = Vec::new();
    for &b in &dom.rpo {
        for &h in &cfg.blocks[b].succs {
            if !dom.dominates(h, b) {
                continue;
            }
            let idx = match loops.iter().position(|l| l.header == h) {
                Some(i) => i,
                None => {
                    loops.push(Loop {
                        header: h,
                        latches: Vec::new(),
                        blocks: BTreeSet::from([h]),
                    });
                    loops.len() - 1
                }
            };
            let l = &mut loops[idx];
            l.latches.push(b);
            let mut work = vec![b];
            while let Some(x) = work.pop() {
                if l.blocks.insert(x) {
                    work.extend(
                        cfg.blocks[x]
                            .preds
                            .iter()
                            .copied()
                            .filter(|&p| dom.reachable(p)),
                    );
                }
            }
        }
    }
    // Block indices follow addresses.
    loops.sort_by_key(|l| cfg.blocks[l.header].first);
    loops
}
