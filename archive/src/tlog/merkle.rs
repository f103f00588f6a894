//! RFC 9162 §2.1 Merkle trees over SHA-256: leaf and node hashes, tree heads, inclusion and consistency
//! proofs and their verification, and the [`Frontier`] an appender keeps instead of every leaf.
//!
//! Proofs are generated over any source of subtree hashes ([`Subtrees`]): the whole list of leaf hashes (a
//! verifier, which has every leaf) or an old frontier plus the leaves appended since (the committer, which
//! keeps no history). A consistency proof from size `m` to `n` only ever needs the complete subtrees that make
//! up the tree of size `m` (its frontier) and subtrees of the leaves `[m, n)`.

use ring::digest::{Context, SHA256};

/// A SHA-256 hash of a leaf, a node or a tree.
pub type Hash = [u8; 32];

/// The leaf hash of `data`: SHA-256(0x00 || data).
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut context = Context::new(&SHA256);
    context.update(&[0]);
    context.update(data);
    to_hash(context)
}

/// An interior node's hash: SHA-256(0x01 || left || right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut context = Context::new(&SHA256);
    context.update(&[1]);
    context.update(left);
    context.update(right);
    to_hash(context)
}

/// The root of the empty tree: SHA-256 of nothing.
pub fn empty_root() -> Hash {
    to_hash(Context::new(&SHA256))
}

fn to_hash(context: Context) -> Hash {
    let mut hash = [0u8; 32];
    hash.copy_from_slice(context.finish().as_ref());
    hash
}

/// The largest power of two strictly below `n` (`n >= 2`): where RFC 9162 splits a tree of `n` leaves.
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

/// The hash of the tree over the leaf hashes `leaves` (RFC 9162 MTH).
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n as u64) as usize;
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// Where a proof generator gets the hash of the subtree over leaves `[start, end)`. It is only ever asked for
/// ranges a proof needs (see the module documentation); a source that cannot answer says so.
pub trait Subtrees {
    fn subtree(&self, start: u64, end: u64) -> Option<Hash>;
}

/// Every leaf hash, in order.
impl Subtrees for [Hash] {
    fn subtree(&self, start: u64, end: u64) -> Option<Hash> {
        self.get(start as usize..end as usize).map(root)
    }
}

/// The inclusion proof of leaf `index` in the tree of `size` leaves (RFC 9162 §2.1.3.1), or `None` when
/// `index >= size` or `tree` cannot supply a subtree.
pub fn inclusion_proof(
    tree: &(impl Subtrees + ?Sized),
    index: u64,
    size: u64,
) -> Option<Vec<Hash>> {
    if index >= size {
        return None;
    }
    let mut proof = Vec::new();
    path(tree, index, 0, size, &mut proof)?;
    Some(proof)
}

fn path(
    tree: &(impl Subtrees + ?Sized),
    index: u64,
    start: u64,
    end: u64,
    proof: &mut Vec<Hash>,
) -> Option<()> {
    let n = end - start;
    if n <= 1 {
        return Some(());
    }
    let k = split(n);
    if index < k {
        path(tree, index, start, start + k, proof)?;
        proof.push(tree.subtree(start + k, end)?);
    } else {
        path(tree, index - k, start + k, end, proof)?;
        proof.push(tree.subtree(start, start + k)?);
    }
    Some(())
}

/// Checks an inclusion proof (RFC 9162 §2.1.3.2): that `leaf` is leaf `index` of the tree of `size` leaves
/// whose root is `root`.
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            skip_left_edges(&mut fn_, &mut sn);
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    sn == 0 && r == *root
}

/// RFC 9162's "right-shift fn and sn equally until either LSB(fn) is set or fn is 0", shared by both
/// verifications: climbs past the levels where the node is its parent's left child with no right sibling.
fn skip_left_edges(fn_: &mut u64, sn: &mut u64) {
    while *fn_ & 1 == 0 && *fn_ != 0 {
        *fn_ >>= 1;
        *sn >>= 1;
    }
}

/// The consistency proof from the tree of `old_size` leaves to the tree of `new_size` leaves (RFC 9162
/// §2.1.4.1), or `None` when `old_size > new_size` or `tree` cannot supply a subtree. Empty when either size
/// is 0 or they are equal.
pub fn consistency_proof(
    tree: &(impl Subtrees + ?Sized),
    old_size: u64,
    new_size: u64,
) -> Option<Vec<Hash>> {
    if old_size > new_size {
        return None;
    }
    let mut proof = Vec::new();
    if old_size > 0 && old_size < new_size {
        subproof(tree, old_size, 0, new_size, true, &mut proof)?;
    }
    Some(proof)
}

fn subproof(
    tree: &(impl Subtrees + ?Sized),
    m: u64,
    start: u64,
    end: u64,
    whole_old_tree: bool,
    proof: &mut Vec<Hash>,
) -> Option<()> {
    let n = end - start;
    if m == n {
        if !whole_old_tree {
            proof.push(tree.subtree(start, end)?);
        }
        return Some(());
    }
    let k = split(n);
    if m <= k {
        subproof(tree, m, start, start + k, whole_old_tree, proof)?;
        proof.push(tree.subtree(start + k, end)?);
    } else {
        subproof(tree, m - k, start + k, end, false, proof)?;
        proof.push(tree.subtree(start, start + k)?);
    }
    Some(())
}

/// Checks a consistency proof (RFC 9162 §2.1.4.2): that the tree of `old_size` leaves with root `old_root` is
/// a prefix of the tree of `new_size` leaves with root `new_root`.
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> bool {
    if old_size > new_size {
        return false;
    }
    if old_size == new_size {
        return proof.is_empty() && old_root == new_root;
    }
    if old_size == 0 {
        return proof.is_empty();
    }
    if proof.is_empty() {
        return false;
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old_size.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    let (mut fn_, mut sn) = (old_size - 1, new_size - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            skip_left_edges(&mut fn_, &mut sn);
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    fr == *old_root && sr == *new_root && sn == 0
}

/// The right edge of a tree: the roots of its complete subtrees, largest (leftmost) first, one per set bit of
/// its size. Enough to append leaves and compute the root without keeping the leaves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// `(height, hash)`: a complete subtree of `2^height` leaves; heights strictly decrease.
    nodes: Vec<(u32, Hash)>,
}

impl Frontier {
    pub fn new() -> Frontier {
        Frontier::default()
    }

    /// The frontier of a tree of `size` leaves from its subtree roots (largest first), as stored; `None` when
    /// their number does not match `size`.
    pub fn from_parts(size: u64, hashes: &[Hash]) -> Option<Frontier> {
        if hashes.len() != size.count_ones() as usize {
            return None;
        }
        let heights = (0..64u32).rev().filter(|bit| size & (1 << bit) != 0);
        Some(Frontier {
            size,
            nodes: heights.zip(hashes.iter().copied()).collect(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The subtree roots, largest first (what [`Self::from_parts`] takes back).
    pub fn hashes(&self) -> Vec<Hash> {
        self.nodes.iter().map(|(_, hash)| *hash).collect()
    }

    pub fn push(&mut self, leaf: Hash) {
        let mut node = (0u32, leaf);
        while let Some(&(height, left)) = self.nodes.last() {
            if height != node.0 {
                break;
            }
            self.nodes.pop();
            node = (height + 1, node_hash(&left, &node.1));
        }
        self.nodes.push(node);
        self.size += 1;
    }

    /// The tree's root.
    pub fn root(&self) -> Hash {
        let mut nodes = self.nodes.iter().rev();
        let Some(&(_, mut hash)) = nodes.next() else {
            return empty_root();
        };
        for (_, left) in nodes {
            hash = node_hash(left, &hash);
        }
        hash
    }
}

/// A frontier of the first `frontier.size()` leaves and the leaf hashes appended after it: answers every
/// subtree a consistency proof from the frontier's size needs, and any subtree of the appended leaves.
pub struct Extended<'a> {
    pub frontier: &'a Frontier,
    pub appended: &'a [Hash],
}

impl Subtrees for Extended<'_> {
    fn subtree(&self, start: u64, end: u64) -> Option<Hash> {
        let old = self.frontier.size;
        if start >= old {
            return self.appended.subtree(start - old, end - old);
        }
        // A complete subtree of the old tree: one of the frontier's nodes.
        let mut at = 0u64;
        for &(height, hash) in &self.frontier.nodes {
            let width = 1u64 << height;
            if at == start && at + width == end {
                return Some(hash);
            }
            at += width;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect()
    }

    #[test]
    fn hashes_follow_rfc_9162() {
        // SHA-256 of the empty string.
        assert_eq!(
            hex::encode(empty_root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // RFC 6962's test vector tree: the leaf hash of the empty leaf, and the root of its 8-leaf tree.
        assert_eq!(
            hex::encode(leaf_hash(b"")),
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
        );
        let vectors: Vec<Vec<u8>> = vec![
            vec![],
            vec![0x00],
            vec![0x10],
            vec![0x20, 0x21],
            vec![0x30, 0x31],
            vec![0x40, 0x41, 0x42, 0x43],
            vec![0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57],
            vec![
                0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x6b, 0x6c, 0x6d,
                0x6e, 0x6f,
            ],
        ];
        let hashes: Vec<Hash> = vectors.iter().map(|data| leaf_hash(data)).collect();
        assert_eq!(
            hex::encode(root(&hashes)),
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"
        );
        assert_eq!(
            hex::encode(root(&hashes[..3])),
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77"
        );
    }

    #[test]
    fn the_frontier_round_trips_its_parts() {
        let mut frontier = Frontier::new();
        for leaf in leaves(13) {
            frontier.push(leaf);
        }
        let back = Frontier::from_parts(13, &frontier.hashes()).expect("parts");
        assert_eq!(back, frontier);
        assert!(Frontier::from_parts(12, &frontier.hashes()).is_none());
    }

    proptest! {
        #[test]
        fn frontier_roots_and_proofs_verify_and_tampering_fails(
            size in 1u64..70, old in 0u64..70, index in 0u64..70, flip in 0usize..8,
        ) {
            let all = leaves(size);
            let mut frontier = Frontier::new();
            for leaf in &all {
                frontier.push(*leaf);
            }
            let tree_root = root(&all);
            prop_assert_eq!(frontier.root(), tree_root);

            let index = index % size;
            let proof = inclusion_proof(all.as_slice(), index, size).expect("inclusion");
            prop_assert!(verify_inclusion(index, size, &all[index as usize], &proof, &tree_root));
            prop_assert!(!verify_inclusion(index, size, &leaf_hash(b"other"), &proof, &tree_root));
            if !proof.is_empty() {
                let mut bad = proof.clone();
                let at = flip % bad.len();
                bad[at][0] ^= 1;
                prop_assert!(!verify_inclusion(index, size, &all[index as usize], &bad, &tree_root));
            }

            let old = old % (size + 1);
            let old_root = root(&all[..old as usize]);
            let proof = consistency_proof(all.as_slice(), old, size).expect("consistency");
            prop_assert!(verify_consistency(old, size, &old_root, &tree_root, &proof));
            // The committer's way: the old frontier and the appended leaves give the same proof.
            let mut old_frontier = Frontier::new();
            for leaf in &all[..old as usize] {
                old_frontier.push(*leaf);
            }
            let extended = Extended { frontier: &old_frontier, appended: &all[old as usize..] };
            prop_assert_eq!(consistency_proof(&extended, old, size).expect("from the frontier"), proof.clone());
            if old > 0 && old < size {
                let mut other = all.clone();
                other[(flip as u64 % old) as usize][0] ^= 1;
                prop_assert!(!verify_consistency(old, size, &root(&other[..old as usize]), &tree_root, &proof));
                let mut bad = proof.clone();
                let at = flip % bad.len();
                bad[at][0] ^= 1;
                prop_assert!(!verify_consistency(old, size, &old_root, &tree_root, &bad));
            }
        }
    }
}
