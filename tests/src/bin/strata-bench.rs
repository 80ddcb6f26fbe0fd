//! Benchmarks beside the tools a user would otherwise use (root; run by `scripts/bench`):
//!
//! 1. the engine's merged view of a 5-layer stack of 50,000 entries, against the kernel's own
//!    overlay mount of the same layers walked by `find`;
//! 2. `overlayctl add-layer` of a 1 GiB tree, against `cp -a` followed by `sync`.
//!
//! Prints a Markdown table of median times and ratios. Not a test: nothing here asserts speed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use overlayctl::engine::{Kind, Layer, MergedView, XattrNs};
use tests::{mount_overlay, overlay_dirs, private_mount_namespace};

const RUNS: usize = 5;

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn time(runs: usize, mut f: impl FnMut()) -> Duration {
    f(); // warm the page cache and the dentry cache
    median(
        (0..runs)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed()
            })
            .collect(),
    )
}

/// The median of three timed runs of `op`, each after `setup` (untimed, its writes flushed so
/// that `op` does not pay for them) and, when `cold`, with the page cache dropped.
fn median_of_3(cold: bool, setup: &mut dyn FnMut(), op: &mut dyn FnMut()) -> Duration {
    median(
        (0..3)
            .map(|_| {
                setup();
                if cold {
                    drop_caches();
                } else {
                    run(&mut Command::new("sync"));
                }
                let start = Instant::now();
                op();
                start.elapsed()
            })
            .collect(),
    )
}

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed");
}

/// Five layers of 10,000 entries each over the same directory names, so they merge: each layer
/// has 100 directories of 99 files; upper layers replace some files of lower ones.
fn make_stack(root: &Path) -> Vec<PathBuf> {
    (0..5)
        .map(|layer| {
            let dir = root.join(format!("layer{layer}"));
            for d in 0..100 {
                let sub = dir.join(format!("dir{d:03}"));
                fs::create_dir_all(&sub).unwrap();
                for f in 0..99 {
                    // Layers share a third of their names, so the view really merges.
                    let name = if f % 3 == 0 {
                        format!("shared{f:03}")
                    } else {
                        format!("l{layer}-f{f:03}")
                    };
                    fs::write(sub.join(name), format!("{layer}/{d}/{f}")).unwrap();
                }
            }
            dir
        })
        .collect()
}

fn count_entries(layers: &[Layer]) -> usize {
    MergedView::new(layers).len()
}

fn bench_merged_view(scratch: &Path) -> (Duration, Duration, Duration, usize) {
    let dirs = make_stack(&scratch.join("stack"));
    let top_first: Vec<PathBuf> = dirs.iter().rev().cloned().collect();
    let mut entries = 0;
    let engine = time(RUNS, || {
        let layers = Layer::read_all(&top_first, XattrNs::Trusted).unwrap();
        entries = count_entries(&layers);
    });
    let (upper, work, merged) = overlay_dirs(scratch);
    let lowers: Vec<&Path> = top_first.iter().map(PathBuf::as_path).collect();
    mount_overlay(&lowers, &upper, &work, &merged, "").unwrap();
    let mut found = 0;
    let kernel = time(RUNS, || {
        let out = Command::new("find").arg(&merged).output().unwrap();
        found = out.stdout.iter().filter(|&&b| b == b'\n').count();
    });
    // The same, with the metadata the engine reads for every path.
    let kernel_stat = time(RUNS, || {
        let out = Command::new("find")
            .arg(&merged)
            .args(["-printf", "%p %m %U %G %s %T@ %l\\n"])
            .output()
            .unwrap();
        assert!(out.status.success());
    });
    nix::mount::umount(&merged).unwrap();
    assert_eq!(
        found, entries,
        "find over the mount and the engine see the same number of paths"
    );
    (engine, kernel, kernel_stat, entries)
}

/// A 1 GiB tree: 16 files of 32 MiB, 4,096 of 64 KiB and 8,192 of 32 KiB in 64 directories.
fn make_gib_tree(root: &Path) -> u64 {
    let mut total = 0;
    let mut write = |path: PathBuf, size: usize, seed: usize| {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let data: Vec<u8> = (0..size)
            .map(|i| (i.wrapping_mul(31) ^ seed) as u8)
            .collect();
        fs::write(path, data).unwrap();
        total += size as u64;
    };
    for i in 0..16 {
        write(root.join(format!("big/file{i}")), 32 << 20, i);
    }
    for i in 0..4096 {
        write(root.join(format!("mid/d{:02}/f{i}", i % 64)), 64 << 10, i);
    }
    for i in 0..8192 {
        write(root.join(format!("small/d{:02}/f{i}", i % 64)), 32 << 10, i);
    }
    total
}

fn drop_caches() {
    run(&mut Command::new("sync"));
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

fn bench_add_layer(scratch: &Path, overlayctl: &Path) -> (Duration, Duration, u64) {
    let source = scratch.join("gib");
    let bytes = make_gib_tree(&source);
    let base = scratch.join("base");
    fs::create_dir_all(base.join("etc")).unwrap();
    let mut ours = Vec::new();
    let mut cp = Vec::new();
    for round in 0..3 {
        let store = scratch.join(format!("store{round}"));
        run(Command::new(overlayctl)
            .arg("--store")
            .arg(&store)
            .args(["init", "--base"])
            .arg(&base)
            .stdout(std::process::Stdio::null()));
        drop_caches();
        let start = Instant::now();
        run(Command::new(overlayctl)
            .arg("--store")
            .arg(&store)
            .args(["add-layer", "--name", "gib"])
            .arg(&source)
            .stdout(std::process::Stdio::null()));
        ours.push(start.elapsed());
        fs::remove_dir_all(&store).unwrap();

        let copy = scratch.join(format!("copy{round}"));
        drop_caches();
        let start = Instant::now();
        run(Command::new("cp").arg("-a").arg(&source).arg(&copy));
        run(&mut Command::new("sync"));
        cp.push(start.elapsed());
        fs::remove_dir_all(&copy).unwrap();
    }
    (median(ours), median(cp), bytes)
}

/// A store of `count` layers (short names, one file each) under `root/strata`.
fn make_store(root: &Path, count: usize) {
    let store = root.join("strata");
    let mut layers = Vec::new();
    for i in (0..count).rev() {
        let name = format!("l{i:03}");
        let dir = store.join("layers").join(&name).join("etc");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(format!("f{i}")), i.to_string()).unwrap();
        layers.push(layers_spec::Layer::new(name));
    }
    let mut plan = layers_spec::Plan::new(layers);
    plan.layers.last_mut().unwrap().known_good = true;
    layers_store::Store::open(&store)
        .unwrap()
        .save_plan(&plan)
        .unwrap();
}

/// Timed runs of each side of the hook benchmark: its figures are milliseconds, which this
/// machine's noise moves by half, so many runs, taken in turns.
const HOOK_RUNS: usize = 41;

/// The hook's boot flow (as the `boot` command: plan, state, resolve, mount, record, bind the
/// store) against `mount(8)` of the same stack, each as a process, per stack size. The hook is
/// the static binary an initramfs holds, and its run directory a tmpfs, as `/run` is at boot.
/// The two take turns, so a slow moment of the machine falls on both.
fn bench_hook(scratch: &Path, hook: &Path) -> Vec<(usize, Duration, Duration)> {
    let mut rows = Vec::new();
    for count in [1, 10, 100, 500] {
        let root = scratch.join(format!("hook{count}"));
        make_store(&root.join("sysroot"), count);
        let (newroot, run_dir) = (root.join("newroot"), root.join("run"));
        fs::create_dir_all(&newroot).unwrap();
        fs::create_dir_all(&run_dir).unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "strata-bench-run"])
            .arg(&run_dir));
        let unmount_all = || {
            for target in [newroot.clone(), run_dir.join("strata/store")] {
                while nix::mount::umount(&target).is_ok() {}
            }
        };
        let boot = || {
            run(Command::new(hook)
                .args(["boot", "--cmdline", ""])
                .arg("--sysroot")
                .arg(root.join("sysroot"))
                .arg("--newroot")
                .arg(&newroot)
                .arg("--run")
                .arg(&run_dir)
                .stdout(std::process::Stdio::null()));
        };
        // mount(8) of the same stack with the same upper, named relative to layers/ as the hook
        // does on kernels whose option string must carry them.
        let store = root.join("sysroot/strata");
        let lowers: Vec<String> = (0..count).rev().map(|i| format!("l{i:03}")).collect();
        let upper = store.join("uppers/1");
        let options = format!(
            "lowerdir={},upperdir={},workdir={},redirect_dir=nofollow,index=off,metacopy=off,xino=off",
            lowers.join(":"),
            upper.join("data").display(),
            upper.join("work").display()
        );
        let mount = || {
            run(Command::new("mount")
                .args(["-t", "overlay", "strata", "-o", &options])
                .arg(&newroot)
                .current_dir(store.join("layers")));
        };
        let timed = |f: &dyn Fn()| {
            let start = Instant::now();
            f();
            let took = start.elapsed();
            unmount_all();
            took
        };
        // Warm the caches, and make the upper the hook makes at its first boot.
        timed(&boot);
        timed(&mount);
        let (mut hook_times, mut mount_times) = (Vec::new(), Vec::new());
        for _ in 0..HOOK_RUNS {
            hook_times.push(timed(&boot));
            mount_times.push(timed(&mount));
        }
        nix::mount::umount(&run_dir).unwrap();
        rows.push((count, median(hook_times), median(mount_times)));
    }
    rows
}

/// `overlayctl` with the store at `store`, its output kept.
fn overlayctl_in(overlayctl: &Path, store: &Path) -> Command {
    let mut cmd = Command::new(overlayctl);
    cmd.arg("--store").arg(store);
    cmd
}

fn output(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A fresh copy of `tree` at `to` (untimed setup for the tools that update a tree in place).
fn copy_tree(tree: &Path, to: &Path) {
    if to.exists() {
        fs::remove_dir_all(to).unwrap();
    }
    run(Command::new("cp").arg("-a").arg(tree).arg(to));
}

/// What per-file `zstd --patch-from` needs for the files of `new` that differ from `old`: each
/// changed file patched against the old one, each new file compressed whole, at the bundle's
/// level. A lower bound for that approach: symlinks, deletions, metadata and a manifest are not
/// counted.
fn zstd_patch_bytes(old: &Path, new: &Path, scratch: &Path) -> u64 {
    let list = output(
        Command::new("find")
            .arg(new)
            .args(["-type", "f", "-printf", "%P\\n"]),
    );
    let out = scratch.join("zstd.out");
    let mut total = 0;
    for path in list.lines() {
        let (before, after) = (old.join(path), new.join(path));
        let old_is_file = fs::symlink_metadata(&before).is_ok_and(|m| m.is_file());
        if old_is_file && fs::read(&before).unwrap() == fs::read(&after).unwrap() {
            continue;
        }
        let mut zstd = Command::new("zstd");
        zstd.args(["-q", "-f", "-15"]);
        if old_is_file {
            zstd.arg(format!("--patch-from={}", before.display()));
        }
        // zstd prints tuning advice for every patch; only its result matters here.
        run(zstd
            .arg(&after)
            .arg("-o")
            .arg(&out)
            .stderr(std::process::Stdio::null()));
        total += fs::metadata(&out).unwrap().len();
    }
    total
}

/// The figures of a real upgrade between two trees (`scripts/debian-trees`).
struct Upgrade {
    files: usize,
    changed_packages: usize,
    packages: usize,
    delta: serde_json::Value,
    bundle: u64,
    batch: u64,
    batch_z: u64,
    zstd: u64,
    create: Duration,
    write_batch: Duration,
    sync_dry: Duration,
    rsync_dry: Duration,
    sync_dry_cold: Duration,
    rsync_dry_cold: Duration,
    sync: Duration,
    rsync: Duration,
    apply: Duration,
    read_batch: Duration,
}

fn bench_upgrade(scratch: &Path, overlayctl: &Path, trees: &Path) -> Upgrade {
    let (old, new) = (trees.join("old"), trees.join("new"));
    let slash = |p: &Path| format!("{}/", p.display());
    let store = scratch.join("upgrade-store");
    let init = |store: &Path| {
        if store.exists() {
            fs::remove_dir_all(store).unwrap();
        }
        output(
            overlayctl_in(overlayctl, store)
                .args(["init", "--base"])
                .arg(&old),
        );
    };
    init(&store);
    let dry_run = || {
        output(
            overlayctl_in(overlayctl, &store)
                .args(["--json", "sync", "--dry-run"])
                .arg(&new),
        )
    };
    let delta: serde_json::Value = serde_json::from_str(&dry_run()).unwrap();
    let rsync_dry_run = || {
        run(Command::new("rsync")
            .args(["-a", "--delete", "--dry-run"])
            .arg(slash(&new))
            .arg(slash(&old)));
    };
    let sync_dry = time(RUNS, || {
        dry_run();
    });
    let rsync_dry = time(RUNS, rsync_dry_run);
    let sync_dry_cold = median_of_3(true, &mut || {}, &mut || {
        dry_run();
    });
    let rsync_dry_cold = median_of_3(true, &mut || {}, &mut || rsync_dry_run());

    // The whole job, to disk: Strata adds the layer (copy, fsync, manifest); rsync updates a
    // copy of the old tree in place, then `sync`.
    let added = std::cell::Cell::new(false);
    let sync = median_of_3(
        true,
        &mut || {
            if added.replace(false) {
                output(overlayctl_in(overlayctl, &store).args(["remove", "up"]));
            }
        },
        &mut || {
            output(
                overlayctl_in(overlayctl, &store)
                    .args(["sync", "--name", "up"])
                    .arg(&new),
            );
            added.set(true);
        },
    );
    let copy = scratch.join("upgrade-copy");
    let rsync = median_of_3(true, &mut || copy_tree(&old, &copy), &mut || {
        run(Command::new("rsync")
            .args(["-a", "--delete"])
            .arg(slash(&new))
            .arg(slash(&copy)));
        run(&mut Command::new("sync"));
    });

    // Bundle against rsync's batch (delta transfer forced: a local rsync copies whole files).
    let bundle = scratch.join("upgrade.bundle");
    let create = time(1, || {
        bundle_create(overlayctl, &old, &new, &bundle);
    });
    let write_batch = |file: &Path, extra: &[&str]| {
        let _ = fs::remove_file(file);
        run(Command::new("rsync")
            .args(["-a", "--delete", "--no-whole-file"])
            .args(extra)
            .arg(format!("--only-write-batch={}", file.display()))
            .arg(slash(&new))
            .arg(slash(&old)));
        fs::metadata(file).unwrap().len()
    };
    let (batch_file, batch_z_file) = (scratch.join("batch"), scratch.join("batch-z"));
    let mut batch = 0;
    let write_batch_time = time(1, || batch = write_batch(&batch_file, &[]));
    let batch_z = write_batch(&batch_z_file, &["-z"]);
    let zstd = zstd_patch_bytes(&old, &new, scratch);

    // Applying: the bundle to a fresh store of the old tree; the batch to a fresh copy of it.
    let apply = median_of_3(true, &mut || init(&store), &mut || {
        output(
            overlayctl_in(overlayctl, &store)
                .args(["add-layer", "--bundle"])
                .arg(&bundle),
        );
    });
    let read_batch = median_of_3(true, &mut || copy_tree(&old, &copy), &mut || {
        run(Command::new("rsync")
            .args(["-a", "--delete"])
            .arg(format!("--read-batch={}", batch_z_file.display()))
            .arg(slash(&copy)));
        run(&mut Command::new("sync"));
    });
    let list = fs::read_to_string(trees.join("packages.txt")).unwrap();
    let files = output(Command::new("find").arg(&new)).lines().count();
    Upgrade {
        files,
        changed_packages: list.lines().count(),
        packages: fs::read_to_string(trees.join("all-packages.txt"))
            .unwrap()
            .lines()
            .count(),
        delta,
        bundle: fs::metadata(&bundle).unwrap().len(),
        batch,
        batch_z,
        zstd,
        create,
        write_batch: write_batch_time,
        sync_dry,
        rsync_dry,
        sync_dry_cold,
        rsync_dry_cold,
        sync,
        rsync,
        apply,
        read_batch,
    }
}

/// `overlayctl bundle create` from `old` to `new` into `out`.
fn bundle_create(overlayctl: &Path, old: &Path, new: &Path, out: &Path) {
    output(
        Command::new(overlayctl)
            .args(["bundle", "create", "--from"])
            .arg(old)
            .arg("--to")
            .arg(new)
            .arg("-o")
            .arg(out),
    );
}

/// How one tool carried the upgrade: the update's size, the time to make it and to apply it
/// (cold cache), the apply's peak memory, and how exactly the result is the new tree.
struct Peer {
    tool: &'static str,
    size: u64,
    make: Duration,
    apply: Duration,
    peak_kib: u64,
    exact: String,
}

/// Runs `cmd` under `/usr/bin/time`: its wall time and peak resident memory (KiB).
fn timed_peak(cmd: &mut Command, scratch: &Path) -> (Duration, u64) {
    let report = scratch.join("time.out");
    let mut timed = Command::new("/usr/bin/time");
    timed
        .args(["-f", "%M", "-o"])
        .arg(&report)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    if let Some(dir) = cmd.get_current_dir() {
        timed.current_dir(dir);
    }
    let start = Instant::now();
    output(timed.stdout(std::process::Stdio::null()));
    let took = start.elapsed();
    let peak = fs::read_to_string(&report).unwrap().trim().parse().unwrap();
    (took, peak)
}

/// The median time of three runs of `run` (each returns its time and peak memory), with the
/// largest peak.
fn median_peak(run: &mut dyn FnMut() -> (Duration, u64)) -> (Duration, u64) {
    let runs: Vec<(Duration, u64)> = (0..3).map(|_| run()).collect();
    let peak = runs.iter().map(|r| r.1).max().unwrap_or(0);
    (median(runs.into_iter().map(|r| r.0).collect()), peak)
}

/// Every path of `tree` with what identifies it: kind, mode, owner, content hash or link
/// target, mtime, and the first path of its hard-link group.
fn tree_facts(tree: &Path) -> std::collections::BTreeMap<PathBuf, (String, i64, String)> {
    use std::os::unix::fs::MetadataExt;
    let mut facts = std::collections::BTreeMap::new();
    let mut first: std::collections::HashMap<u64, PathBuf> = std::collections::HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = tree.join(&rel);
        let meta = fs::symlink_metadata(&path).unwrap();
        let kind = if meta.is_dir() {
            let mut names: Vec<_> = fs::read_dir(&path)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            stack.extend(names.into_iter().map(|n| rel.join(n)));
            "dir".to_owned()
        } else if meta.file_type().is_symlink() {
            format!("link {}", fs::read_link(&path).unwrap().display())
        } else if meta.is_file() {
            format!(
                "file {}",
                overlayctl::engine::manifest::hash_file(&path).unwrap()
            )
        } else {
            format!("special {}", meta.rdev())
        };
        let links = match meta.is_file() && meta.nlink() > 1 {
            true => first
                .entry(meta.ino())
                .or_insert_with(|| rel.clone())
                .display()
                .to_string(),
            false => String::new(),
        };
        let mtime = if meta.is_dir() { 0 } else { meta.mtime() };
        facts.insert(
            rel,
            (
                format!("{kind} {:o} {}:{}", meta.mode(), meta.uid(), meta.gid()),
                mtime,
                links,
            ),
        );
    }
    facts
}

/// How `made` differs from `want`: "exact", or what differs.
fn compare_trees(made: &Path, want: &Path) -> String {
    let (made, want) = (tree_facts(made), tree_facts(want));
    let (mut content, mut mtimes, mut links) = (0, 0, 0);
    let missing = want.keys().filter(|p| !made.contains_key(*p)).count()
        + made.keys().filter(|p| !want.contains_key(*p)).count();
    for (path, (what, mtime, group)) in &want {
        let Some((m_what, m_mtime, m_group)) = made.get(path) else {
            continue;
        };
        content += usize::from(what != m_what);
        mtimes += usize::from(mtime != m_mtime);
        links += usize::from(group != m_group);
    }
    if missing + content + mtimes + links == 0 {
        return "exact".to_owned();
    }
    let mut said = Vec::new();
    for (n, what) in [
        (missing, "paths missing or extra"),
        (content, "paths with other content, kind, mode or owner"),
        (links, "files in other hard-link groups"),
        (mtimes, "other mtimes"),
    ] {
        if n > 0 {
            said.push(format!("{n} {what}"));
        }
    }
    said.join(", ")
}

/// The same upgrade with OSTree (a static delta between two commits, pulled into a bare repo
/// holding the old commit and checked out) and casync (the new tree's chunks the old tree's
/// store lacks, extracted with the old tree as seed), beside the bundle.
fn bench_peers(scratch: &Path, overlayctl: &Path, trees: &Path) -> Vec<Peer> {
    let (old, new) = (trees.join("old"), trees.join("new"));
    let bundle = &scratch.join("peer.bundle");
    let _ = fs::remove_file(bundle);
    let start = Instant::now();
    bundle_create(overlayctl, &old, &new, bundle);
    let create = start.elapsed();
    let dir_size = |dir: &Path| -> u64 {
        output(Command::new("du").args(["-sb"]).arg(dir))
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let mut peers = Vec::new();

    // Strata: the bundle made above, applied to a store of the old tree.
    let store = scratch.join("peer-store");
    let (apply, peak_kib) = median_peak(&mut || {
        let _ = fs::remove_dir_all(&store);
        output(
            overlayctl_in(overlayctl, &store)
                .args(["init", "--base"])
                .arg(&old),
        );
        drop_caches();
        timed_peak(
            overlayctl_in(overlayctl, &store)
                .args(["add-layer", "--name", "up", "--bundle"])
                .arg(bundle),
            scratch,
        )
    });
    let mounted = scratch.join("peer-mount");
    fs::create_dir_all(&mounted).unwrap();
    output(overlayctl_in(overlayctl, &store).arg("mount").arg(&mounted));
    let exact = compare_trees(&mounted, &new);
    run(Command::new("umount").arg(&mounted));
    peers.push(Peer {
        tool: "Strata bundle (`bundle create`, `add-layer --bundle`)",
        size: fs::metadata(bundle).unwrap().len(),
        make: create,
        apply,
        peak_kib,
        exact,
    });

    // OSTree: commits of both trees in an archive repo, a static delta between them.
    let repo = scratch.join("ostree-server");
    let _ = fs::remove_dir_all(&repo);
    let ostree = |repo: &Path| {
        let mut cmd = Command::new("ostree");
        cmd.arg(format!("--repo={}", repo.display()));
        cmd
    };
    output(ostree(&repo).args(["init", "--mode=archive"]));
    let commit = |branch: &str, tree: &Path| {
        output(
            ostree(&repo)
                .args(["commit", "-b", branch, "-s", branch])
                .arg(format!("--tree=dir={}", tree.display())),
        )
    };
    commit("old", &old);
    let start = Instant::now();
    commit("new", &new);
    output(ostree(&repo).args(["static-delta", "generate", "--from=old", "--to=new"]));
    // The summary is where a client finds the deltas.
    output(ostree(&repo).args(["summary", "-u"]));
    let make = start.elapsed();
    let size = dir_size(&repo.join("deltas"));
    // The device: a bare repo holding the old commit, pulling the new one through the delta.
    let device = scratch.join("ostree-device");
    let checkout = scratch.join("ostree-checkout");
    let (apply, peak_kib) = median_peak(&mut || {
        let _ = fs::remove_dir_all(&device);
        let _ = fs::remove_dir_all(&checkout);
        output(ostree(&device).args(["init", "--mode=bare"]));
        output(
            ostree(&device)
                .args(["remote", "add", "--no-gpg-verify", "server"])
                .arg(format!("file://{}", repo.display())),
        );
        output(ostree(&device).args(["pull", "--disable-static-deltas", "server", "old"]));
        drop_caches();
        let (pull, pull_peak) = timed_peak(
            ostree(&device).args(["pull", "--require-static-deltas", "server", "new"]),
            scratch,
        );
        let (check_out, checkout_peak) = timed_peak(
            ostree(&device)
                .args(["checkout", "server:new"])
                .arg(&checkout),
            scratch,
        );
        let start = Instant::now();
        run(&mut Command::new("sync"));
        (
            pull + check_out + start.elapsed(),
            pull_peak.max(checkout_peak),
        )
    });
    peers.push(Peer {
        tool: "OSTree static delta (`commit` + `static-delta generate`, `pull` + `checkout`)",
        size,
        make,
        apply,
        peak_kib,
        exact: compare_trees(&checkout, &new),
    });

    // casync: the old tree's chunk store on the device; the new tree's index and the chunks
    // it adds sent; extracted with the old tree as seed.
    let (old_store, new_store) = (
        scratch.join("casync-old.castr"),
        scratch.join("casync.castr"),
    );
    let (old_index, new_index) = (scratch.join("old.caidx"), scratch.join("new.caidx"));
    for dir in [&old_store, &new_store] {
        let _ = fs::remove_dir_all(dir);
    }
    output(
        Command::new("casync")
            .arg("make")
            .arg(format!("--store={}", old_store.display()))
            .arg(&old_index)
            .arg(&old),
    );
    let start = Instant::now();
    output(
        Command::new("casync")
            .arg("make")
            .arg(format!("--store={}", new_store.display()))
            .arg(&new_index)
            .arg(&new),
    );
    let make = start.elapsed();
    let chunks = |store: &Path| -> std::collections::HashMap<String, u64> {
        output(
            Command::new("find")
                .arg(store)
                .args(["-type", "f", "-printf", "%f %s\\n"]),
        )
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(name, size)| (name.to_owned(), size.parse().unwrap()))
        .collect()
    };
    let had = chunks(&old_store);
    let size = chunks(&new_store)
        .into_iter()
        .filter(|(name, _)| !had.contains_key(name))
        .map(|(_, size)| size)
        .sum::<u64>()
        + fs::metadata(&new_index).unwrap().len();
    let extracted = scratch.join("casync-new");
    let (extract, peak_kib) = median_peak(&mut || {
        let _ = fs::remove_dir_all(&extracted);
        drop_caches();
        let (took, peak) = timed_peak(
            Command::new("casync")
                .arg("extract")
                .arg(format!("--store={}", new_store.display()))
                .arg(format!("--seed={}", old.display()))
                .arg(&new_index)
                .arg(&extracted),
            scratch,
        );
        let start = Instant::now();
        run(&mut Command::new("sync"));
        (took + start.elapsed(), peak)
    });
    peers.push(Peer {
        tool: "casync (`make`, `extract --seed` of the old tree)",
        size,
        make,
        apply: extract,
        peak_kib,
        exact: compare_trees(&extracted, &new),
    });
    peers
}

fn print_peers(peers: &[Peer]) {
    let mib = |b: u64| format!("{:.2} MiB", b as f64 / f64::from(1 << 20));
    let ours = &peers[0];
    println!();
    println!(
        "| update | size | size / Strata's | make | apply, cold cache | apply's peak memory | the result against the new tree |"
    );
    println!("|---|---|---|---|---|---|---|");
    for p in peers {
        println!(
            "| {} | {} | {:.2} | {:.1} s | {:.2} s | {} MiB | {} |",
            p.tool,
            mib(p.size),
            p.size as f64 / ours.size as f64,
            p.make.as_secs_f64(),
            p.apply.as_secs_f64(),
            p.peak_kib / 1024,
            p.exact
        );
    }
}

/// A base of 50,000 files (500 directories of 100, 1 to 4 KiB) and ten upgrade layers over it,
/// each changing 1,000 files, adding 200 and deleting 100 (whiteouts, of base files and of
/// files earlier upgrades added). Returns the base and the layers, bottom first.
fn make_compaction_stack(root: &Path) -> (PathBuf, Vec<PathBuf>) {
    let write = |path: PathBuf, seed: usize| {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let size = 1024 + (seed * 7919) % 3072;
        let data: Vec<u8> = (0..size)
            .map(|i| (i.wrapping_mul(31) ^ seed) as u8)
            .collect();
        fs::write(path, data).unwrap();
    };
    let base = root.join("base");
    for i in 0..50_000 {
        write(base.join(format!("d{:03}/f{i}", i / 100)), i);
    }
    let layers = (1..=10)
        .map(|n| {
            let dir = root.join(format!("up{n:02}"));
            for k in 0..1_000 {
                let i = (n * 4_999 + k * 37) % 50_000;
                write(dir.join(format!("d{:03}/f{i}", i / 100)), i + n);
            }
            for k in 0..200 {
                write(dir.join(format!("d{:03}/new-{n}-{k}", k)), n * 1000 + k);
            }
            for k in 0..100 {
                // Half delete base files, half delete what the previous upgrade added.
                let name = if k % 2 == 0 || n == 1 {
                    let i = (n * 7_919 + k * 211) % 50_000;
                    format!("d{:03}/f{i}", i / 100)
                } else {
                    format!("d{:03}/new-{}-{k}", k, n - 1)
                };
                let path = dir.join(name);
                if path.exists() {
                    continue;
                }
                fs::create_dir_all(path.parent().unwrap()).unwrap();
                nix::sys::stat::mknod(
                    &path,
                    nix::sys::stat::SFlag::S_IFCHR,
                    nix::sys::stat::Mode::empty(),
                    0,
                )
                .unwrap();
            }
            dir
        })
        .collect();
    (base, layers)
}

/// `overlayctl compact` of ten layers over a 50,000-file base, against the same merge done by
/// copying the ten layers in order into a fresh directory with `rsync -aHX` and with `cp -a`
/// (each then flushed with `sync`; the stack over the base shows the same tree, checked).
/// Cold and warm cache medians.
type ColdWarm = (Duration, Duration);

/// `overlayctl compact --from FROM --to TO` (a run of `count` layers) on a fresh copy of the
/// store `template` at `store`, cold and warm, the stack mounted at `mounted` meanwhile, as a
/// device's running stack is: the replaced layers stay until unused (as rsync's sources stay);
/// deleting them is the next boot's work. Returns the times and the compacted layer.
fn time_compaction(
    overlayctl: &Path,
    template: &Path,
    store: &Path,
    mounted: &Path,
    (from, to, count): (&str, &str, usize),
) -> (ColdWarm, PathBuf) {
    fs::create_dir_all(mounted).unwrap();
    let compacted = std::cell::RefCell::new(PathBuf::new());
    let mounted_now = std::cell::Cell::new(false);
    let mut setup = || {
        if mounted_now.replace(false) {
            output(overlayctl_in(overlayctl, store).arg("umount").arg(mounted));
        }
        copy_tree(template, store);
        output(
            overlayctl_in(overlayctl, store)
                .args(["mount", "--read-only"])
                .arg(mounted),
        );
        mounted_now.set(true);
    };
    let mut compact = || {
        let report = output(
            overlayctl_in(overlayctl, store)
                .args(["--json", "compact", "--from", from, "--to", to]),
        );
        let report: serde_json::Value = serde_json::from_str(&report).unwrap();
        assert_eq!(report["pending"].as_array().map(Vec::len), Some(count));
        *compacted.borrow_mut() = store.join("layers").join(report["layer"].as_str().unwrap());
    };
    let times = (
        median_of_3(true, &mut setup, &mut compact),
        median_of_3(false, &mut setup, &mut compact),
    );
    output(overlayctl_in(overlayctl, store).arg("umount").arg(mounted));
    (times, compacted.into_inner())
}

fn bench_compact(scratch: &Path, overlayctl: &Path) -> (ColdWarm, ColdWarm, ColdWarm, usize) {
    let (base, layers) = make_compaction_stack(&scratch.join("compaction"));
    let template = scratch.join("compaction-store");
    output(
        overlayctl_in(overlayctl, &template)
            .args(["init", "--base"])
            .arg(&base),
    );
    for layer in &layers {
        output(
            overlayctl_in(overlayctl, &template)
                .args(["add-layer", "--active"])
                .arg(layer),
        );
    }
    let (ours, compacted) = time_compaction(
        overlayctl,
        &template,
        &scratch.join("compaction-run"),
        &scratch.join("compaction-mounted"),
        ("up01", "up10", 10),
    );
    let merged = scratch.join("compaction-merged");
    let fresh = || {
        if merged.exists() {
            fs::remove_dir_all(&merged).unwrap();
        }
        fs::create_dir(&merged).unwrap();
    };
    let by_copy = |cold: bool, copy: &mut dyn FnMut(&Path, &Path)| {
        median_of_3(cold, &mut || fresh(), &mut || {
            for layer in &layers {
                copy(layer, &merged);
            }
            run(&mut Command::new("sync"));
        })
    };
    let mut rsync_copy = |layer: &Path, to: &Path| {
        run(Command::new("rsync")
            .arg("-aHX")
            .arg(format!("{}/", layer.display()))
            .arg(format!("{}/", to.display())));
    };
    let rsync = (
        by_copy(true, &mut rsync_copy),
        by_copy(false, &mut rsync_copy),
    );
    let mut cp_copy = |layer: &Path, to: &Path| {
        run(Command::new("cp")
            .args(["-a", "--remove-destination"])
            .arg(format!("{}/.", layer.display()))
            .arg(to));
    };
    let cp = (by_copy(true, &mut cp_copy), by_copy(false, &mut cp_copy));
    // The same tree over the base, whichever way it was merged.
    let shown = |top: &Path| {
        let layers = Layer::read_all(&[top.to_owned(), base.clone()], XattrNs::Trusted).unwrap();
        tests::views::engine_view(&layers)
    };
    let (ours_shown, copied_shown) = (shown(&compacted), shown(&merged));
    assert_eq!(
        tests::views::first_difference(&copied_shown, &ours_shown),
        None,
        "the compacted layer and the copied merge show different trees"
    );
    (ours, rsync, cp, ours_shown.len())
}

/// Entries of a tree, its root included.
fn tree_entries(node: &overlayctl::engine::Node) -> usize {
    match &node.kind {
        Kind::Dir { children, .. } => 1 + children.values().map(tree_entries).sum::<usize>(),
        _ => 1,
    }
}

/// What merging one layer into a directory by hand must remove first: the paths its whiteouts
/// delete (rsync cannot put a whiteout where a directory is) and the contents of its opaque
/// directories (rsync would keep what is already there), relative to the layer, each with
/// whether it is an opaque directory.
fn hidden_by(layer: &Path) -> Vec<(PathBuf, bool)> {
    fn go(node: &overlayctl::engine::Node, rel: &mut PathBuf, out: &mut Vec<(PathBuf, bool)>) {
        match &node.kind {
            Kind::Whiteout => out.push((rel.clone(), false)),
            Kind::Dir { opaque, children } => {
                if *opaque && !rel.as_os_str().is_empty() {
                    out.push((rel.clone(), true));
                }
                for (name, child) in children {
                    rel.push(name);
                    go(child, rel, out);
                    rel.pop();
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    go(
        &Layer::read(layer, XattrNs::Trusted).unwrap().tree,
        &mut PathBuf::new(),
        &mut out,
    );
    out
}

/// Compaction of a real stack (`scripts/debian-stack`: a Debian 12 minbase base and layers of
/// apt-get installs, a purge and the published updates) into one layer, mounted as a running
/// stack is, against merging the same layers by hand: each layer in order with `rsync -aHAX`
/// into a fresh directory (after removing what its whiteouts and opaque directories hide, found
/// before the clock starts) and `sync`. Returns (ours, rsync) cold and warm, the paths the
/// result shows over the base, and the run's entries.
fn bench_compact_debian(
    scratch: &Path,
    overlayctl: &Path,
    stack: &Path,
) -> (ColdWarm, ColdWarm, usize, usize) {
    let template = stack.join("store");
    let names: Vec<String> = fs::read_to_string(stack.join("layers.txt"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let (bottom, top) = (&names[0], &names[names.len() - 1]);
    let (ours, compacted) = time_compaction(
        overlayctl,
        &template,
        &scratch.join("debian-compact"),
        &scratch.join("debian-compact-mounted"),
        (bottom, top, names.len()),
    );
    let layers: Vec<PathBuf> = names
        .iter()
        .map(|n| template.join("layers").join(n))
        .collect();
    let hidden: Vec<Vec<(PathBuf, bool)>> = layers.iter().map(|l| hidden_by(l)).collect();
    let entries: usize = layers
        .iter()
        .map(|l| tree_entries(&Layer::read(l, XattrNs::Trusted).unwrap().tree))
        .sum();
    let merged = scratch.join("debian-compact-merged");
    let mut fresh = || {
        if merged.exists() {
            fs::remove_dir_all(&merged).unwrap();
        }
        fs::create_dir(&merged).unwrap();
    };
    let mut by_rsync = || {
        for (layer, hidden) in layers.iter().zip(&hidden) {
            for (rel, opaque) in hidden {
                let path = merged.join(rel);
                match fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() && *opaque => {
                        for entry in fs::read_dir(&path).unwrap() {
                            let entry = entry.unwrap().path();
                            if entry.symlink_metadata().unwrap().is_dir() {
                                fs::remove_dir_all(&entry).unwrap();
                            } else {
                                fs::remove_file(&entry).unwrap();
                            }
                        }
                    }
                    Ok(m) if m.is_dir() => fs::remove_dir_all(&path).unwrap(),
                    Ok(_) if !*opaque => fs::remove_file(&path).unwrap(),
                    _ => {}
                }
            }
            run(Command::new("rsync")
                .arg("-aHAX")
                .arg(format!("{}/", layer.display()))
                .arg(format!("{}/", merged.display())));
        }
        run(&mut Command::new("sync"));
    };
    let rsync = (
        median_of_3(true, &mut fresh, &mut by_rsync),
        median_of_3(false, &mut fresh, &mut by_rsync),
    );
    // The same tree over the base, whichever way it was merged.
    let base = template.join("layers/base");
    let shown = |top: &Path| {
        let layers = Layer::read_all(&[top.to_owned(), base.clone()], XattrNs::Trusted).unwrap();
        tests::views::engine_view(&layers)
    };
    let (ours_shown, copied_shown) = (shown(&compacted), shown(&merged));
    assert_eq!(
        tests::views::first_difference(&copied_shown, &ours_shown),
        None,
        "the compacted layer and the rsync merge show different trees"
    );
    (ours, rsync, ours_shown.len(), entries)
}

/// Freezing a running system's upper into a layer: the hook's boot with a pending checkpoint
/// (rename, clean in place, plan; then the usual mount) against the same boot without one, and
/// against copying the upper into a layer with `cp -a` + `sync` (which would also keep
/// overlayfs's bookkeeping). The upper is a real one: a 20,000-file base booted through the
/// hook, then 5,000 files changed, 5,000 deleted and 5,000 made through the overlay. Warm cache.
fn bench_checkpoint(
    scratch: &Path,
    overlayctl: &Path,
    hook: &Path,
) -> (Duration, Duration, Duration, usize) {
    let root = scratch.join("checkpoint");
    let base = root.join("base");
    for i in 0..20_000 {
        let path = base.join(format!("d{:03}/f{i}", i / 100));
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, vec![(i % 251) as u8; 1024]).unwrap();
    }
    let template = root.join("template");
    let store = template.join("sysroot/strata");
    output(
        overlayctl_in(overlayctl, &store)
            .args(["init", "--base"])
            .arg(&base),
    );
    let boot = |machine: &Path| {
        for dir in ["newroot", "run"] {
            fs::create_dir_all(machine.join(dir)).unwrap();
        }
        run(Command::new(hook)
            .args(["boot", "--cmdline", ""])
            .arg("--sysroot")
            .arg(machine.join("sysroot"))
            .arg("--newroot")
            .arg(machine.join("newroot"))
            .arg("--run")
            .arg(machine.join("run"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()));
    };
    let shutdown = |machine: &Path| {
        for target in [machine.join("newroot"), machine.join("run/strata/store")] {
            while nix::mount::umount(&target).is_ok() {}
        }
    };
    boot(&template);
    let newroot = template.join("newroot");
    for i in 0..5_000 {
        let dir = newroot.join(format!("d{:03}", i * 4 / 100));
        fs::write(dir.join(format!("f{}", i * 4)), b"changed").unwrap();
        fs::remove_file(dir.join(format!("f{}", i * 4 + 1))).unwrap();
        fs::write(dir.join(format!("new{i}")), vec![7u8; 1024]).unwrap();
    }
    shutdown(&template);
    let entries = tests::dir_names(&store.join("uppers/1/data"))
        .iter()
        .map(|d| tests::dir_names(&store.join("uppers/1/data").join(d)).len() + 1)
        .sum();
    let plain = root.join("plain");
    let pending = root.join("pending");
    copy_tree(&template, &plain);
    copy_tree(&template, &pending);
    let state_of = |machine: &Path| machine.join("sysroot/strata");
    let mut state = layers_store::Store::open(&state_of(&pending))
        .unwrap()
        .load_state()
        .unwrap()
        .value;
    state.checkpoint = Some(layers_spec::Checkpoint {
        layer: "cp".into(),
        title: None,
        upper: "1".into(),
        parent: None,
        frozen: false,
    });
    layers_store::Store::open(&state_of(&pending))
        .unwrap()
        .save_state(&state)
        .unwrap();

    let work = root.join("machine");
    let timed_boot = |from: &Path| {
        median_of_3(false, &mut || copy_tree(from, &work), &mut || {
            boot(&work);
            shutdown(&work);
        })
    };
    let with_freeze = timed_boot(&pending);
    assert!(
        state_of(&work).join("layers/cp").is_dir(),
        "the checkpoint was not frozen"
    );
    let without = timed_boot(&plain);
    let copied = median_of_3(false, &mut || copy_tree(&template, &work), &mut || {
        run(Command::new("cp")
            .arg("-a")
            .arg(state_of(&work).join("uppers/1/data"))
            .arg(state_of(&work).join("layers/cp")));
        run(&mut Command::new("sync"));
    });
    (with_freeze, without, copied, entries)
}

fn main() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the benchmarks mount overlays and drop caches: run as root"
    );
    let usage = "usage: strata-bench PATH-TO-overlayctl PATH-TO-initramfs-hook SCRATCH-DIR TREES-DIR STACK-DIR [BENCHMARK…]";
    let overlayctl = std::env::args().nth(1).map(PathBuf::from).expect(usage);
    let hook = std::env::args().nth(2).map(PathBuf::from).expect(usage);
    let scratch_parent = std::env::args().nth(3).map(PathBuf::from).expect(usage);
    let trees = std::env::args().nth(4).map(PathBuf::from).expect(usage);
    let stack = std::env::args().nth(5).map(PathBuf::from).expect(usage);
    let mut scratch = tempfile::Builder::new()
        .prefix("strata-bench.")
        .tempdir_in(&scratch_parent)
        .unwrap();
    // STRATA_BENCH_KEEP=1 leaves the scratch directory for a look afterwards.
    scratch.disable_cleanup(std::env::var_os("STRATA_BENCH_KEEP").is_some());
    private_mount_namespace();

    // Further arguments pick benchmarks by name (view, hook, add, compact, checkpoint, upgrade,
    // which includes peers: the same upgrade by OSTree and casync); none: all.
    let only: Vec<String> = std::env::args().skip(6).collect();
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    println!("| benchmark | Strata | the usual tool | ratio (tool / Strata) |");
    println!("|---|---|---|---|");
    if wanted("view") {
        let (engine, find, find_stat, entries) = bench_merged_view(scratch.path());
        println!(
            "| merged view of 5 layers of 10,100 entries, {entries} merged paths (warm cache) | engine: read + merge + walk {} | overlay mount + `find` (names only) {} | {:.2} |",
            ms(engine),
            ms(find),
            find.as_secs_f64() / engine.as_secs_f64()
        );
        println!(
            "| the same, with each path's metadata | engine (as above; it always reads metadata and xattrs) {} | overlay mount + `find -printf '%m %U %G %s %T@ %l'` {} | {:.2} |",
            ms(engine),
            ms(find_stat),
            find_stat.as_secs_f64() / engine.as_secs_f64()
        );
    }
    if wanted("add") {
        let (add, cp, bytes) = bench_add_layer(scratch.path(), &overlayctl);
        println!(
            "| add a {} MiB tree of 12,304 files (cold cache) | `overlayctl add-layer` (copy, fsync, manifest) {} | `cp -a` + `sync` {} | {:.2} |",
            bytes >> 20,
            ms(add),
            ms(cp),
            cp.as_secs_f64() / add.as_secs_f64()
        );
    }
    if wanted("hook") {
        for (count, hook_time, mount_time) in bench_hook(scratch.path(), &hook) {
            println!(
                "| boot flow to the mounted stack, {count} layer{} | `initramfs-hook boot` (plan, state, resolve, mount, record) {} | `mount -t overlay` (mount(8)) {} | {:.2} |",
                if count == 1 { "" } else { "s" },
                ms(hook_time),
                ms(mount_time),
                mount_time.as_secs_f64() / hook_time.as_secs_f64()
            );
        }
    }
    if wanted("compact") {
        let (compact, rsync, cp, paths) = bench_compact(scratch.path(), &overlayctl);
        for (tool, time) in [
            ("`rsync -aHX` of each layer + `sync`", rsync),
            ("`cp -a` of each layer + `sync`", cp),
        ] {
            for (cache, ours, theirs) in [("cold", compact.0, time.0), ("warm", compact.1, time.1)]
            {
                println!(
                    "| merge 10 synthetic layers (13,000 entries) over a 50,000-file base into one, {paths} paths shown ({cache} cache) | `overlayctl compact` {} | {tool} {} | {:.2} |",
                    ms(ours),
                    ms(theirs),
                    theirs.as_secs_f64() / ours.as_secs_f64()
                );
            }
        }
    }
    if wanted("compact") {
        let (ours, rsync, paths, entries) =
            bench_compact_debian(scratch.path(), &overlayctl, &stack);
        for (cache, ours, theirs) in [("cold", ours.0, rsync.0), ("warm", ours.1, rsync.1)] {
            println!(
                "| merge a real stack of package layers (apt-get installs, a purge, updates: {entries} entries) into one, {paths} paths shown over the Debian base ({cache} cache) | `overlayctl compact` {} | `rsync -aHAX` of each layer + `sync` {} | {:.2} |",
                ms(ours),
                ms(theirs),
                theirs.as_secs_f64() / ours.as_secs_f64()
            );
        }
    }
    if wanted("checkpoint") {
        let (with_freeze, without, copied, entries) =
            bench_checkpoint(scratch.path(), &overlayctl, &hook);
        println!(
            "| freeze a running system's upper ({entries} entries: 5,000 changed, 5,000 deleted, 5,000 new files) into a layer (warm cache) | the boot with the checkpoint pending {} (the same boot without: {}; the freeze: {}) | `cp -a` of the upper into `layers/` + `sync` {} | {:.2} |",
            ms(with_freeze),
            ms(without),
            ms(with_freeze.saturating_sub(without)),
            ms(copied),
            copied.as_secs_f64() / with_freeze.saturating_sub(without).as_secs_f64().max(1e-6)
        );
    }
    if wanted("upgrade") {
        print_upgrade(&bench_upgrade(scratch.path(), &overlayctl, &trees));
    }
    if wanted("pull") {
        print_pull(&bench_pull(scratch.path(), &overlayctl, &stack));
    }
    if wanted("upgrade") || only.iter().any(|o| o == "peers") {
        print_peers(&bench_peers(scratch.path(), &overlayctl, &trees));
    }
}

/// Pulling a real image from a registry: a Debian 12 system (the compaction benchmark's
/// debootstrap base as one layer, its package layers merged as a second), built with umoci,
/// pushed to Debian's docker-registry on 127.0.0.1. Cold cache each run; the bytes counted by
/// a proxy between the tool and the registry.
/// A tool's median time, largest peak memory (KiB) and bytes downloaded.
type Cost = (Duration, u64, u64);

struct Pull {
    /// What, then Strata's cost and skopeo's.
    rows: Vec<(String, Cost, Cost)>,
    /// skopeo copy followed by umoci unpack (a runnable tree, as Strata's pull gives), for v1.
    unpacked: (Duration, u64),
}

fn bench_pull(scratch: &Path, overlayctl: &Path, stack: &Path) -> Pull {
    use tests::oci::{CuttingProxy, Layout, Registry};
    let store = stack.join("store");
    let layout_dir = scratch.join("pull-layout");
    let layout = Layout::new(&layout_dir, &scratch.join("pull-umoci"));
    layout.layer(
        None,
        "v1",
        "debootstrap --variant=minbase bookworm",
        |root| {
            run(Command::new("cp")
                .arg("-a")
                .arg(store.join("layers/base/."))
                .arg(root));
        },
    );
    layout.layer(
        Some("v1"),
        "v2",
        "apt-get install python3 perl curl vim-tiny …; apt-get upgrade",
        |root| {
            let mnt = scratch.join("pull-mnt");
            fs::create_dir_all(&mnt).unwrap();
            run(Command::new(overlayctl)
                .arg("--store")
                .arg(&store)
                .args(["mount", "--read-only"])
                .arg(&mnt));
            run(Command::new("rsync")
                .args(["-aHAX", "--delete"])
                .arg(format!("{}/", mnt.display()))
                .arg(format!("{}/", root.display())));
            run(Command::new(overlayctl)
                .arg("--store")
                .arg(&store)
                .arg("umount")
                .arg(&mnt));
        },
    );
    let registry = Registry::start(&scratch.join("pull-registry"), None);
    for tag in ["v1", "v2"] {
        layout.copy(
            tag,
            &format!("docker://{}/debian:{tag}", registry.host()),
            &["--dest-tls-verify=false"],
        );
    }
    let proxy = CuttingProxy::start(registry.port);
    let host = format!("127.0.0.1:{}", proxy.port);
    let moved = || proxy.moved.swap(0, std::sync::atomic::Ordering::SeqCst);
    let ours = |args: &[&str], store: &Path| {
        let mut cmd = Command::new(overlayctl);
        cmd.arg("--store").arg(store).args(args).arg("--insecure");
        cmd
    };
    let skopeo = |tag: &str, dir: &Path| {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "-q", "--src-tls-verify=false"])
            .arg(format!("docker://{host}/debian:{tag}"))
            .arg(format!("oci:{}:{tag}", dir.display()));
        cmd
    };
    let mut rows = Vec::new();
    let mut first = (Vec::new(), Vec::new());
    let mut update = (Vec::new(), Vec::new());
    let mut unpacked = Vec::new();
    for n in 0..3 {
        // The whole image into an empty store, and by skopeo into an empty layout.
        let s = scratch.join(format!("pull-store-{n}"));
        let _ = fs::remove_dir_all(&s);
        drop_caches();
        moved();
        let (t, peak) = timed_peak(
            &mut ours(&["init", "--image", &format!("{host}/debian:v1")], &s),
            scratch,
        );
        first.0.push((t, peak, moved()));
        let d = scratch.join(format!("pull-oci-{n}"));
        let _ = fs::remove_dir_all(&d);
        drop_caches();
        let (t, peak) = timed_peak(&mut skopeo("v1", &d), scratch);
        first.1.push((t, peak, moved()));
        // What a runnable tree costs skopeo's user: umoci unpack after the copy.
        let tree = scratch.join(format!("pull-tree-{n}"));
        let _ = fs::remove_dir_all(&tree);
        drop_caches();
        let (u, upeak) = timed_peak(
            Command::new("umoci")
                .args(["unpack", "--image"])
                .arg(format!("{}:v1", d.display()))
                .arg(&tree),
            scratch,
        );
        unpacked.push((t + u, peak.max(upeak)));
        fs::remove_dir_all(&tree).unwrap();
        // The update: only the new layer moves.
        drop_caches();
        let (t, peak) = timed_peak(
            &mut ours(&["pull", &format!("{host}/debian:v2")], &s),
            scratch,
        );
        update.0.push((t, peak, moved()));
        drop_caches();
        let (t, peak) = timed_peak(&mut skopeo("v2", &d), scratch);
        update.1.push((t, peak, moved()));
        fs::remove_dir_all(&s).unwrap();
        fs::remove_dir_all(&d).unwrap();
    }
    let pick = |runs: Vec<Cost>| {
        let peak = runs.iter().map(|r| r.1).max().unwrap_or(0);
        let bytes = runs[0].2;
        (median(runs.into_iter().map(|r| r.0).collect()), peak, bytes)
    };
    rows.push((
        "the whole image into an empty store / layout".to_owned(),
        pick(first.0),
        pick(first.1),
    ));
    rows.push((
        "the update v1 → v2 (the base layer held)".to_owned(),
        pick(update.0),
        pick(update.1),
    ));
    let peak = unpacked.iter().map(|u| u.1).max().unwrap_or(0);
    Pull {
        rows,
        unpacked: (median(unpacked.into_iter().map(|u| u.0).collect()), peak),
    }
}

fn print_pull(p: &Pull) {
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / f64::from(1 << 20));
    println!();
    println!("Pulling a Debian 12 image (2 layers) from a local docker-registry, cold cache:");
    println!();
    println!(
        "| measure | Strata `pull` (download, check, unpack into layers) | `skopeo copy` to an OCI layout (download, check) | ratio (skopeo / Strata) |"
    );
    println!("|---|---|---|---|");
    for (what, ours, theirs) in &p.rows {
        println!(
            "| {what}: time | {} | {} | {:.2} |",
            ms(ours.0),
            ms(theirs.0),
            theirs.0.as_secs_f64() / ours.0.as_secs_f64()
        );
        println!(
            "| {what}: bytes moved | {} | {} | {:.2} |",
            mib(ours.2),
            mib(theirs.2),
            theirs.2 as f64 / ours.2.max(1) as f64
        );
        println!(
            "| {what}: peak memory | {} KiB | {} KiB | {:.2} |",
            ours.1,
            theirs.1,
            theirs.1 as f64 / ours.1.max(1) as f64
        );
    }
    let (ours, _, _) = p.rows[0].1;
    println!(
        "| the whole image to a runnable tree: time | {} | `skopeo copy` + `umoci unpack` {} | {:.2} |",
        ms(ours),
        ms(p.unpacked.0),
        p.unpacked.0.as_secs_f64() / ours.as_secs_f64()
    );
}

fn print_upgrade(u: &Upgrade) {
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    let mib = |b: u64| format!("{:.2} MiB", b as f64 / f64::from(1 << 20));
    let ratio = |tool: Duration, ours: Duration| tool.as_secs_f64() / ours.as_secs_f64();
    let d = &u.delta;
    let what = format!(
        "Debian 12 standard system, {} of {} packages upgraded, {} paths ({} added, {} changed, {} new metadata, {} deleted)",
        u.changed_packages,
        u.packages,
        u.files,
        d["added"],
        d["changed"],
        d["metadata"],
        d["deleted"]
    );
    println!();
    println!("{what}:");
    println!();
    println!("| measure | Strata | the usual tool | ratio (tool / Strata) |");
    println!("|---|---|---|---|");
    let size_row = |tool: &str, bytes: u64| {
        println!(
            "| update size | bundle {} | {tool} {} | {:.2} |",
            mib(u.bundle),
            mib(bytes),
            bytes as f64 / u.bundle as f64
        );
    };
    size_row("`rsync --only-write-batch --no-whole-file`", u.batch);
    size_row(
        "the same with `-z` (zlib: a batch file takes no other)",
        u.batch_z,
    );
    size_row("per-file `zstd -15 --patch-from` (file data only)", u.zstd);
    let time_row = |measure: &str, ours: &str, a: Duration, tool: &str, b: Duration| {
        println!(
            "| {measure} | {ours} {} | {tool} {} | {:.2} |",
            ms(a),
            ms(b),
            ratio(b, a)
        );
    };
    time_row(
        "making the update",
        "`bundle create`",
        u.create,
        "`rsync --only-write-batch`",
        u.write_batch,
    );
    time_row(
        "comparing, warm cache",
        "`sync --dry-run`",
        u.sync_dry,
        "`rsync -a --delete --dry-run`",
        u.rsync_dry,
    );
    time_row(
        "comparing, cold cache",
        "`sync --dry-run`",
        u.sync_dry_cold,
        "`rsync -a --delete --dry-run`",
        u.rsync_dry_cold,
    );
    time_row(
        "upgrading from the new tree, cold cache",
        "`sync` (layer written and flushed)",
        u.sync,
        "`rsync -a --delete` into a copy + `sync`",
        u.rsync,
    );
    time_row(
        "applying the update, cold cache",
        "`add-layer --bundle`",
        u.apply,
        "`rsync --read-batch` into a copy + `sync`",
        u.read_batch,
    );
    let raw = d["bytes"].as_u64().unwrap_or(0);
    println!(
        "\nThe bundle carries {} of file content ({} compressed): applied at {:.1} MiB/s of content.",
        mib(raw),
        mib(u.bundle),
        raw as f64 / f64::from(1 << 20) / u.apply.as_secs_f64()
    );
}
