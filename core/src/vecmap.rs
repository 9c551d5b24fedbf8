//! Small ordered maps and sets as sorted vectors.
//!
//! Owns [`VecMap`] and [`VecSet`]: the subset of `BTreeMap` and `BTreeSet`
//! the client machine uses (its rooms, room streams, pending requests and
//! coalesced keys, each at most a few thousand entries by its limits; and
//! its synced maps, at most 65 536 entries in all, whose snapshots arrive
//! in key order and so are appended), with the same order and results. A B-tree is faster for large collections;
//! these are for small ones, where each `BTreeMap` instantiation's code (7
//! to 9 KB of WebAssembly each, for insertion, removal and rebalancing)
//! costs the browser package more than the sorted vector's moves cost the
//! machine. It never holds a key twice and never reorders equal keys.

use std::borrow::Borrow;

/// A map ordered by key, as a sorted vector: lookups by binary search,
/// insertions and removals move the entries after the place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VecMap<K, V> {
    entries: Vec<(K, V)>,
}

impl<K, V> Default for VecMap<K, V> {
    fn default() -> Self {
        VecMap {
            entries: Vec::new(),
        }
    }
}

impl<K, V> VecMap<K, V> {
    pub(crate) const fn new() -> Self {
        VecMap {
            entries: Vec::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }
}

impl<K: Ord, V> VecMap<K, V> {
    fn find<Q: Ord + ?Sized>(&self, key: &Q) -> Result<usize, usize>
    where
        K: Borrow<Q>,
    {
        self.entries.binary_search_by(|(k, _)| k.borrow().cmp(key))
    }

    pub(crate) fn get<Q: Ord + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.find(key).ok().map(|i| &self.entries[i].1)
    }

    pub(crate) fn get_mut<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        self.find(key).ok().map(|i| &mut self.entries[i].1)
    }

    pub(crate) fn contains_key<Q: Ord + ?Sized>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.find(key).is_ok()
    }

    /// Inserts or replaces; the value replaced, if any (the key kept is
    /// the one already there, as `BTreeMap` keeps it).
    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            Err(i) => {
                self.entries.insert(i, (key, value));
                None
            }
        }
    }

    pub(crate) fn remove<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        self.find(key).ok().map(|i| self.entries.remove(i).1)
    }

    /// Keeps the entries `f` says to, in order.
    pub(crate) fn retain(&mut self, mut f: impl FnMut(&K, &V) -> bool) {
        self.entries.retain(|(k, v)| f(k, v));
    }

    pub(crate) fn first_key_value(&self) -> Option<(&K, &V)> {
        self.entries.first().map(|(k, v)| (k, v))
    }

    pub(crate) fn pop_first(&mut self) -> Option<(K, V)> {
        (!self.entries.is_empty()).then(|| self.entries.remove(0))
    }

    pub(crate) fn iter(&self) -> impl DoubleEndedIterator<Item = (&K, &V)> {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    pub(crate) fn iter_mut(&mut self) -> impl DoubleEndedIterator<Item = (&K, &mut V)> {
        self.entries.iter_mut().map(|(k, v)| (&*k, v))
    }

    pub(crate) fn keys(&self) -> impl DoubleEndedIterator<Item = &K> {
        self.entries.iter().map(|(k, _)| k)
    }

    pub(crate) fn values(&self) -> impl DoubleEndedIterator<Item = &V> {
        self.entries.iter().map(|(_, v)| v)
    }

    pub(crate) fn values_mut(&mut self) -> impl DoubleEndedIterator<Item = &mut V> {
        self.entries.iter_mut().map(|(_, v)| v)
    }

    /// The value of `key`, inserted as `V::default()` if it was not there
    /// (`BTreeMap`'s `entry(key).or_default()`).
    pub(crate) fn or_default(&mut self, key: K) -> &mut V
    where
        V: Default,
    {
        let i = match self.find(&key) {
            Ok(i) => i,
            Err(i) => {
                self.entries.insert(i, (key, V::default()));
                i
            }
        };
        &mut self.entries[i].1
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for VecMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut map = VecMap::new();
        for (k, v) in iter {
            map.insert(k, v);
        }
        map
    }
}

/// A set ordered by value, as a sorted vector (see [`VecMap`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VecSet<K>(VecMap<K, ()>);

impl<K> Default for VecSet<K> {
    fn default() -> Self {
        VecSet(VecMap::default())
    }
}

impl<K> VecSet<K> {
    pub(crate) const fn new() -> Self {
        VecSet(VecMap::new())
    }
}

impl<K: Ord> VecSet<K> {
    pub(crate) fn clear(&mut self) {
        self.0.clear();
    }

    pub(crate) fn contains<Q: Ord + ?Sized>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.0.contains_key(key)
    }

    /// Whether `key` was not there yet.
    pub(crate) fn insert(&mut self, key: K) -> bool {
        match self.0.find(&key) {
            Ok(_) => false,
            Err(i) => {
                self.0.entries.insert(i, (key, ()));
                true
            }
        }
    }

    /// Whether `key` was there.
    pub(crate) fn remove<Q: Ord + ?Sized>(&mut self, key: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.0.remove(key).is_some()
    }

    pub(crate) fn first(&self) -> Option<&K> {
        self.0.first_key_value().map(|(k, ())| k)
    }

    pub(crate) fn pop_first(&mut self) -> Option<K> {
        self.0.pop_first().map(|(k, ())| k)
    }

    pub(crate) fn iter(&self) -> impl DoubleEndedIterator<Item = &K> {
        self.0.keys()
    }
}

impl<K: Ord> FromIterator<K> for VecSet<K> {
    fn from_iter<I: IntoIterator<Item = K>>(iter: I) -> Self {
        let mut set = VecSet::new();
        for k in iter {
            set.insert(k);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    /// The same operations on a `VecMap` and a `BTreeMap`, and on a
    /// `VecSet` and a `BTreeSet`, give the same answers and contents.
    #[test]
    fn they_answer_as_the_b_trees_do() {
        let mut ours = VecMap::new();
        let mut theirs = BTreeMap::new();
        let mut set = VecSet::new();
        let mut btree_set = BTreeSet::new();
        // A deterministic mix of keys, repeats included.
        let mut x = 7u64;
        for step in 0..2_000u64 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let k = (x >> 33) % 97;
            match step % 5 {
                0 | 1 => {
                    assert_eq!(ours.insert(k, step), theirs.insert(k, step));
                    assert_eq!(set.insert(k), btree_set.insert(k));
                }
                2 => {
                    assert_eq!(ours.remove(&k), theirs.remove(&k));
                    assert_eq!(set.remove(&k), btree_set.remove(&k));
                }
                3 => {
                    assert_eq!(ours.pop_first(), theirs.pop_first());
                    assert_eq!(set.pop_first(), btree_set.pop_first());
                }
                _ if step % 3 == 0 => {
                    *ours.or_default(k) += 2;
                    *theirs.entry(k).or_default() += 2;
                }
                _ => {
                    if let Some(v) = ours.get_mut(&k) {
                        *v += 1;
                    }
                    if let Some(v) = theirs.get_mut(&k) {
                        *v += 1;
                    }
                }
            }
            assert_eq!(ours.get(&k), theirs.get(&k));
            assert_eq!(ours.contains_key(&k), theirs.contains_key(&k));
            assert_eq!(ours.first_key_value(), theirs.first_key_value());
            assert_eq!(ours.len(), theirs.len());
            assert_eq!(set.first(), btree_set.first());
            assert_eq!(set.contains(&k), btree_set.contains(&k));
        }
        assert!(ours.iter().eq(theirs.iter()));
        assert!(ours.values().eq(theirs.values()));
        for (v, w) in ours.values_mut().zip(theirs.values_mut()) {
            *v += 1;
            *w += 1;
        }
        for ((k, v), (l, w)) in ours.iter_mut().zip(theirs.iter_mut()) {
            assert_eq!(k, l);
            *v += *k;
            *w += *l;
        }
        assert!(ours.iter().eq(theirs.iter()));
        assert!(set.iter().eq(btree_set.iter()));
        let collected: VecMap<u64, u64> = theirs.clone().into_iter().rev().collect();
        assert!(collected.iter().eq(theirs.iter()));
        ours.clear();
        assert!(ours.is_empty());
    }
}
