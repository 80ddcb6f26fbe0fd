//! Helpers for the power-cut VM test (`tests/tests/vm_power_cut.rs`): the trees the guest
//! changes its store with, the guest's init (a shell loop of store changes with a marker on the
//! serial console before and after each step), the seeded choice of when to cut, and the model
//! of what the plan may hold after a cut, checked against what the next boot finds.
//!
//! The markers, one per line on the console:
//! - `@@ step T KIND ARGS… plan=P up=S`: step KIND of iteration T starts; P is the plan then;
//! - `@@ ok T KIND plan=P staging=NAMES up=S`: it returned success; P is the plan after it;
//! - `@@ fail T KIND rc=N` … `@@ fail-end`: it failed, with its output; the loop stops.
//!
//! A plan is written `name:s,name:s,…`, top first, `s` the first letter of the layer's state
//! (`a`ctive, `t`rial, `d`isabled).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::stat::{UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;

use crate::vm;

/// How many cuts a run makes: `STRATA_POWERCUT_CUTS`, or 20 (the normal test command).
pub fn cuts() -> usize {
    std::env::var("STRATA_POWERCUT_CUTS")
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("STRATA_POWERCUT_CUTS={v:?} is not a number"))
        })
        .unwrap_or(20)
}

/// The run's seed: `STRATA_POWERCUT_SEED` reruns one; otherwise a fresh one from the clock.
pub fn seed() -> u64 {
    match std::env::var("STRATA_POWERCUT_SEED") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("STRATA_POWERCUT_SEED={v:?} is not a number")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    }
}

/// splitmix64: small, seeded, and the same on every machine (no dependency's version can
/// change what a seed replays).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A number in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The target directory this test was built in (`<target>/debug/deps/<test binary>`): static
/// builds go beside it, so a run with its own `CARGO_TARGET_DIR` never rebuilds binaries in
/// another one (under the default target directory this is `vm::static_*`'s own place).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.ancestors()
        .nth(3)
        .expect("a test binary lives in <target>/<profile>/deps")
        .to_owned()
}

/// The guest's /sbin/init. It prints what the boot found (boot record, state, plan, the layer
/// folders, staging/, `overlayctl verify`, the note a frozen checkpoint holds), accepts the
/// boot as the accept unit would (the first change after a cut), prints what layers/ and
/// uppers/ hold then and verifies again, then loops over the store changes until the host
/// cuts the power. Every name it makes carries the boot number (`pc.boot=N` on the command
/// line) and the iteration, so no two boots make the same name.
pub const INIT: &str = r##"#!/bin/sh
PATH=/bin:/sbin; export PATH
S=/run/strata/store
D=/run/strata/root/powercut
B=0
for w in $(cat /proc/cmdline); do case $w in pc.boot=*) B=${w#pc.boot=} ;; esac; done

up() { read u _ < /proc/uptime; echo $u; }
# A plan (the store's, or the file named) as name:s,… (s: the state's first letter; no state
# line means active).
plan() {
  awk 'function out() { if (n != "") { printf "%s%s:%s", sep, n, s; sep = "," } n = ""; s = "a" }
       /^\[\[layer\]\]/ { out(); in_layer = 1; next }
       /^\[/ { out(); in_layer = 0; next }
       in_layer && $1 == "name" { n = $3; gsub(/"/, "", n) }
       in_layer && $1 == "state" { s = substr($3, 2, 1) }
       END { out(); print "" }' ${1:-$S/overlayplan.toml}
}
staging() { ls -A $S/staging | tr '\n' ,; }
stop() { echo "@@ stopped"; sync; poweroff -f; sleep 60; }
# step T KIND ARGS… -- COMMAND…: markers around one store change; a failure stops the loop.
step() {
  t=$1; kind=$2; shift 2
  args=
  while [ "$1" != -- ]; do args="$args $1"; shift; done
  shift
  echo "@@ step $t $kind$args plan=$(plan) up=$(up)"
  out=$("$@" 2>&1); rc=$?
  if [ $rc != 0 ]; then
    echo "@@ fail $t $kind rc=$rc"; echo "$out"; echo "@@ fail-end"; stop
  fi
  echo "@@ ok $t $kind plan=$(plan) staging=$(staging) up=$(up)"
}

# Reports are read through a pipe, as a script reads them: no progress lines on the console.
echo "@@ init $B up=$(up)"
echo "@@ write-cache $(cat /sys/block/vda/queue/write_cache)"
echo "@@ booted-begin"; cat /run/strata/booted.toml; echo "@@ booted-end"
echo "@@ state-begin"; cat $S/state/boot.toml; echo "@@ state-end"
echo "@@ plan-begin"; cat $S/overlayplan.toml; echo "@@ plan-end"
echo "@@ plan $(plan)"
echo "@@ layers $(ls $S/layers | tr '\n' ,)"
echo "@@ staging-at-boot $(staging)"
echo "@@ verify-begin"; out=$(overlayctl verify 2>&1); rc=$?; echo "$out"; echo "@@ verify-end"
echo "@@ verified $rc"
top=$(plan | sed 's/[:,].*//')
case $top in cp-*)
  note=$(cat $S/layers/$top/var/lib/powercut/${top#cp-} 2>/dev/null) || note=missing
  echo "@@ cp-note $top ${note:-empty}" ;;
esac
# The boot is healthy: accept it, as the accept unit does (no names: the running boot's trial
# layers, listed here for the host's model).
stack="$(awk '/^stack = /{f=1} f{e=($0 ~ /]/); gsub(/stack = |[][",]/, ""); printf " %s", $0; if (e) exit}' /run/strata/booted.toml) "
running=
for e in $(plan | tr , ' '); do
  case $e in *:t) case $stack in *" ${e%:t} "*) running="$running ${e%:t}" ;; esac ;; esac
done
step $B-0 accept $running -- overlayctl accept
echo "@@ after-accept layers=$(ls $S/layers | tr '\n' ,) uppers=$(ls $S/uppers | tr '\n' ,) prev=$(plan $S/overlayplan.toml.prev)"
echo "@@ verify2-begin"; out=$(overlayctl verify 2>&1); rc=$?; echo "$out"; echo "@@ verify2-end"
echo "@@ verified2 $rc"
echo "@@ checks-done up=$(up)"

i=0
while :; do
  i=$((i + 1)); t=$B-$i
  step $t add-layer a-$t -- overlayctl add-layer $D/layer --name a-$t
  step $t sync s-$t -- overlayctl sync $D/S --name s-$t
  step $t bundle b-$t -- overlayctl add-layer --bundle $D/S-U.bundle --name b-$t
  trial=$(plan | tr , '\n' | sed -n 's/:t$//p' | tr '\n' ' ')
  step $t accept $trial -- overlayctl accept $trial
  # The run to compact: b-T and the accepted layers under it, down to the base or a
  # disabled layer.
  from=b-$t; seen=
  for e in $(plan | tr , ' '); do
    n=${e%:*}
    if [ -z "$seen" ]; then [ "$n" = b-$t ] && seen=1; continue; fi
    [ "${e#*:}" = a ] && [ "$n" != base ] || break
    from=$n
  done
  step $t compact $from b-$t c-$t -- overlayctl compact --from $from --to b-$t --name c-$t
  # Something for the checkpoint to freeze: a new file, and a deletion (a whiteout).
  mkdir -p /var/lib/powercut
  echo "note $t" > /var/lib/powercut/$t
  rm -f /usr/share/pc/base/d05/f$(((i - 1) % 20 / 10))$(((i - 1) % 10))
  step $t checkpoint cp-$t -- overlayctl checkpoint --name cp-$t
  for n in $(plan | tr , '\n' | sed -n 's/:d$//p'); do
    step $t remove $n -- overlayctl remove --force $n
  done
  step $t remove c-$t -- overlayctl remove c-$t
done
"##;

/// Applets the init uses beyond those `vm::busybox_root_with_init` links.
const MORE_APPLETS: &[&str] = &["awk", "rm", "mkdir"];

/// The times every tree starts with, and those of what the sync target and the bundle's
/// target change: whole seconds, as `mkfs.ext4 -d` keeps no nanoseconds (a layer's manifest
/// written on the host must still verify in the guest), and different, as `sync` compares
/// files by size and mtime.
pub const BASE_TIME: i64 = 1_700_000_000;
pub const SYNC_TIME: i64 = 1_700_100_000;
pub const BUNDLE_TIME: i64 = 1_700_200_000;

fn write(path: &Path, bytes: &[u8]) {
    fs::create_dir_all(path.parent().expect("a parent")).unwrap();
    fs::write(path, bytes).unwrap();
}

/// Small text whose length varies with `i`.
fn text(tag: &str, i: usize) -> Vec<u8> {
    format!("{tag} {i}\n")
        .repeat(1 + (i * 37) % 60)
        .into_bytes()
}

fn cp_a(from: &Path, to: &Path) {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status();
    assert!(status.is_ok_and(|s| s.success()), "cp -a {from:?} {to:?}");
}

/// Every entry under `root` (itself included) whose mtime is not one of `keep` gets `to`.
pub fn settle_times(root: &Path, keep: &[i64], to: i64) {
    let mut stack = vec![root.to_owned()];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            for entry in fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
        }
        use std::os::unix::fs::MetadataExt;
        if meta.mtime_nsec() == 0 && keep.contains(&meta.mtime()) {
            continue;
        }
        let at = TimeSpec::new(to, 0);
        utimensat(
            nix::fcntl::AT_FDCWD,
            &path,
            &at,
            &at,
            UtimensatFlags::NoFollowSymlink,
        )
        .unwrap_or_else(|e| panic!("setting the times of {}: {e}", path.display()));
    }
}

/// The base layer's tree: a busybox root whose init is [`INIT`], a static `overlayctl`, and
/// 300 small files in 15 folders, ten of them with a second name, and a text file the bundle
/// patches.
pub fn base_tree(dir: &Path, overlayctl: &Path) {
    vm::busybox_root_with_init(dir, "base", INIT);
    for applet in MORE_APPLETS {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).unwrap();
    }
    fs::copy(overlayctl, dir.join("bin/overlayctl")).unwrap();
    fs::set_permissions(
        dir.join("bin/overlayctl"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let pc = dir.join("usr/share/pc/base");
    for d in 0..15 {
        for f in 0..20 {
            write(
                &pc.join(format!("d{d:02}/f{f:02}")),
                &text("base", d * 20 + f),
            );
        }
    }
    fs::create_dir_all(pc.join("links")).unwrap();
    for k in 0..10 {
        fs::hard_link(
            pc.join(format!("d00/f{:02}", k + 10)),
            pc.join(format!("links/h{k}")),
        )
        .unwrap();
    }
    let big: String = (0..4000)
        .map(|i| format!("line {i} of the base\n"))
        .collect();
    write(&pc.join("big.txt"), big.as_bytes());
    fs::create_dir_all(dir.join("var/lib")).unwrap();
    settle_times(dir, &[], BASE_TIME);
}

/// What `add-layer` adds: 150 files and 10 second names, in a folder of their own.
pub fn layer_tree(dir: &Path) {
    let pc = dir.join("usr/share/pc/layer");
    for g in 0..150 {
        write(&pc.join(format!("g{g:03}")), &text("layer", g));
    }
    fs::create_dir_all(pc.join("links")).unwrap();
    for k in 0..10 {
        fs::hard_link(pc.join(format!("g{k:03}")), pc.join(format!("links/l{k}"))).unwrap();
    }
    write(&dir.join("etc/layer-note"), b"added by add-layer\n");
    settle_times(dir, &[], BASE_TIME);
}

/// The sync target: the base changed: ten files and one folder deleted, twenty files
/// rewritten, one file's mode changed, 100 new files (five with a second name), and a new name
/// for an unchanged base file. It has neither the added layer's folder nor anything a
/// checkpoint froze, so `sync` also writes whiteouts for those.
pub fn sync_tree(base: &Path, dir: &Path) {
    cp_a(base, dir);
    let pc = dir.join("usr/share/pc");
    for f in 0..10 {
        fs::remove_file(pc.join(format!("base/d00/f{f:02}"))).unwrap();
    }
    fs::remove_dir_all(pc.join("base/d01")).unwrap();
    for f in 0..20 {
        write(&pc.join(format!("base/d02/f{f:02}")), &text("sync", f));
    }
    fs::set_permissions(pc.join("base/d04/f00"), fs::Permissions::from_mode(0o600)).unwrap();
    for n in 0..100 {
        write(&pc.join(format!("sync/n{n:03}")), &text("new in sync", n));
    }
    fs::create_dir_all(pc.join("sync/links")).unwrap();
    for k in 0..5 {
        fs::hard_link(
            pc.join(format!("sync/n{k:03}")),
            pc.join(format!("sync/links/m{k}")),
        )
        .unwrap();
    }
    fs::hard_link(pc.join("base/d03/f00"), pc.join("sync/shared")).unwrap();
    write(&dir.join("etc/version"), b"sync\n");
    settle_times(dir, &[BASE_TIME], SYNC_TIME);
}

/// The bundle's target: the sync target changed: ten files deleted (two of them leaving their
/// second name alone), the base folder d03 rewritten (its first file through both names), one
/// line of the big text file (sent as a patch), a mode, 50 new files (five with a second
/// name) and a symlink.
pub fn bundle_tree(sync: &Path, dir: &Path) {
    cp_a(sync, dir);
    let pc = dir.join("usr/share/pc");
    for n in 0..10 {
        fs::remove_file(pc.join(format!("sync/n{n:03}"))).unwrap();
    }
    for f in 0..20 {
        write(&pc.join(format!("base/d03/f{f:02}")), &text("bundle", f));
    }
    let big = fs::read_to_string(pc.join("base/big.txt")).unwrap();
    write(
        &pc.join("base/big.txt"),
        big.replace("line 2000 of the base", "line 2000 of the bundle")
            .as_bytes(),
    );
    fs::set_permissions(pc.join("base/d04/f01"), fs::Permissions::from_mode(0o700)).unwrap();
    for p in 0..50 {
        write(
            &pc.join(format!("bundle/p{p:02}")),
            &text("new in bundle", p),
        );
    }
    fs::create_dir_all(pc.join("bundle/links")).unwrap();
    for k in 0..5 {
        fs::hard_link(
            pc.join(format!("bundle/p{k:02}")),
            pc.join(format!("bundle/links/q{k}")),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink("../base/d05/f00", pc.join("bundle/sym")).unwrap();
    write(&dir.join("etc/version"), b"bundle\n");
    settle_times(dir, &[BASE_TIME, SYNC_TIME], BUNDLE_TIME);
}

/// A plan as the init prints it: (name, state letter), top first.
pub type PlanList = Vec<(String, char)>;

pub fn parse_plan(text: &str) -> Result<PlanList, String> {
    text.split(',')
        .filter(|e| !e.is_empty())
        .map(|e| match e.rsplit_once(':') {
            Some((name, state)) if state.len() == 1 => {
                Ok((name.to_owned(), state.chars().next().unwrap()))
            }
            _ => Err(format!("{e:?} in the plan {text:?} is not name:state")),
        })
        .collect()
}

pub fn show_plan(plan: &PlanList) -> String {
    plan.iter()
        .map(|(n, s)| format!("{n}:{s}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// One step of the guest's loop, as its markers show it.
#[derive(Debug, Clone)]
pub struct Step {
    /// `BOOT-ITERATION`; iteration 0 is the accept after the boot's checks.
    pub t: String,
    pub kind: String,
    pub args: Vec<String>,
    /// The plan when it started.
    pub before: PlanList,
    /// Guest uptime at the start, in seconds.
    pub up: f64,
    /// Set when its `ok` marker came.
    pub done: Option<Done>,
}

#[derive(Debug, Clone)]
pub struct Done {
    pub after: PlanList,
    pub staging: Vec<String>,
    pub up: f64,
}

fn field<'a>(words: &[&'a str], key: &str) -> Option<&'a str> {
    words.iter().find_map(|w| w.strip_prefix(key))
}

/// The steps the console shows, in order, each with its `ok` when it came. A line cut short
/// by the power cut is not a marker.
pub fn steps(serial: &str) -> Result<Vec<Step>, String> {
    let mut steps: Vec<Step> = Vec::new();
    for line in serial.lines().map(|l| l.trim_end_matches('\r')) {
        let words: Vec<&str> = line.split(' ').collect();
        let complete = field(&words, "up=").is_some_and(|u| u.parse::<f64>().is_ok());
        if !complete || words.len() < 4 {
            continue;
        }
        let up = field(&words, "up=").unwrap().parse().unwrap();
        let plan = |key| {
            field(&words, key)
                .ok_or_else(|| format!("no {key} in {line:?}"))
                .and_then(parse_plan)
        };
        match words[..2] {
            ["@@", "step"] => steps.push(Step {
                t: words[2].to_owned(),
                kind: words[3].to_owned(),
                args: words[4..]
                    .iter()
                    .take_while(|w| !w.starts_with("plan="))
                    .map(|w| (*w).to_owned())
                    .collect(),
                before: plan("plan=")?,
                up,
                done: None,
            }),
            ["@@", "ok"] => {
                let step = steps
                    .last_mut()
                    .filter(|s| s.t == words[2] && s.kind == words[3] && s.done.is_none())
                    .ok_or_else(|| format!("{line:?} ends no step that started"))?;
                step.done = Some(Done {
                    after: plan("plan=")?,
                    staging: field(&words, "staging=")
                        .unwrap_or("")
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect(),
                    up,
                });
            }
            _ => {}
        }
    }
    Ok(steps)
}

/// The plan a step leaves when it completes, from the plan it started with: the store's
/// semantics, written down independently of its code.
pub fn model(step: &Step) -> Result<PlanList, String> {
    let mut plan = step.before.clone();
    let arg = |i: usize| {
        step.args
            .get(i)
            .cloned()
            .ok_or_else(|| format!("step {} {} lacks argument {i}", step.t, step.kind))
    };
    let index = |plan: &PlanList, name: &str| {
        plan.iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| format!("step {} {}: the plan has no {name}", step.t, step.kind))
    };
    match step.kind.as_str() {
        // A new trial layer on top.
        "add-layer" | "sync" | "bundle" => plan.insert(0, (arg(0)?, 't')),
        "accept" => {
            for name in &step.args {
                let i = index(&plan, name)?;
                plan[i].1 = 'a';
            }
        }
        // The run from FROM (bottom) to TO (top) becomes one active layer in its place.
        "compact" => {
            let (bottom, top) = (index(&plan, &arg(0)?)?, index(&plan, &arg(1)?)?);
            if top > bottom {
                return Err(format!("compact {:?}: the run is upside down", step.args));
            }
            plan.splice(top..=bottom, [(arg(2)?, 'a')]);
        }
        // Recorded in the boot state; the next boot freezes it.
        "checkpoint" => {}
        "remove" => {
            let i = index(&plan, &arg(0)?)?;
            plan.remove(i);
        }
        other => return Err(format!("no model for the step {other:?}")),
    }
    Ok(plan)
}

/// What the next boot may find, from what the steps so far did.
#[derive(Debug, Clone, PartialEq)]
pub struct Expect {
    /// The plans the store may hold before the boot's own changes; one when the last step
    /// completed, the one before and the one after when it was cut.
    pub plans: Vec<PlanList>,
    /// Checkpoints the boot may have frozen on top of one of them.
    pub checkpoints: Vec<String>,
    /// One of `checkpoints` must be there (one was asked for and the command returned).
    pub checkpoint_required: bool,
}

impl Expect {
    pub fn exactly(plan: PlanList) -> Self {
        Self {
            plans: vec![plan],
            checkpoints: Vec::new(),
            checkpoint_required: false,
        }
    }

    /// Whether `found` (the plan after a boot) is one this allows. A boot changes a plan in
    /// two ways only: a frozen checkpoint on top, and trial layers whose tries ran out
    /// disabled.
    pub fn check(&self, found: &PlanList) -> Result<(), String> {
        let frozen = found
            .first()
            .filter(|(n, _)| self.checkpoints.contains(n))
            .map(|(n, _)| n.clone());
        if frozen.is_none() && self.checkpoint_required {
            return Err(format!(
                "the plan {} has none of the checkpoints {:?} on top, though one was asked for and `overlayctl checkpoint` returned",
                show_plan(found),
                self.checkpoints
            ));
        }
        let rest = &found[usize::from(frozen.is_some())..];
        let allowed = |want: &PlanList| {
            want.len() == rest.len()
                && want.iter().zip(rest).all(|((wn, ws), (fn_, fs))| {
                    wn == fn_ && (ws == fs || (*ws == 't' && *fs == 'd'))
                })
        };
        if self.plans.iter().any(allowed) {
            return Ok(());
        }
        Err(format!(
            "the plan {} is none of the plans the store may hold: {}{}",
            show_plan(found),
            self.plans
                .iter()
                .map(show_plan)
                .collect::<Vec<_>>()
                .join("  or  "),
            if self.checkpoints.is_empty() {
                String::new()
            } else {
                format!(" (with maybe {:?} on top)", self.checkpoints)
            }
        ))
    }

    /// What the next boot may find after the power was cut with `steps` run (those of one
    /// boot, in order) since a boot printed `plan` (None: the cut came before the boot's
    /// checks printed the plan, so this stays as it was).
    pub fn after(&self, plan: Option<&PlanList>, steps: &[Step]) -> Result<Self, String> {
        let Some(plan) = plan else {
            return Ok(self.clone());
        };
        let mut current = plan.clone();
        let mut pending: Option<String> = None;
        let mut next = Self::exactly(current.clone());
        for (i, step) in steps.iter().enumerate() {
            if step.before != current {
                return Err(format!(
                    "step {} {} started with the plan {}, but the one before it left {}",
                    step.t,
                    step.kind,
                    show_plan(&step.before),
                    show_plan(&current)
                ));
            }
            let after = model(step)?;
            match &step.done {
                Some(done) => {
                    if done.after != after {
                        return Err(format!(
                            "step {} {} {:?} left the plan {}, where {} was expected",
                            step.t,
                            step.kind,
                            step.args,
                            show_plan(&done.after),
                            show_plan(&after)
                        ));
                    }
                    if step.kind == "checkpoint" {
                        pending = step.args.first().cloned();
                    }
                    current = after;
                    next = Self::exactly(current.clone());
                }
                None if i + 1 == steps.len() => {
                    next.plans = vec![current.clone(), after];
                    if step.kind == "checkpoint" {
                        next.checkpoints.extend(step.args.first().cloned());
                    }
                }
                None => {
                    return Err(format!(
                        "step {} {} has no ok, yet another step followed",
                        step.t, step.kind
                    ));
                }
            }
        }
        next.checkpoint_required = pending.is_some();
        next.checkpoints.extend(pending);
        Ok(next)
    }
}

/// The median of `xs` (None when empty).
pub fn median(xs: &[f64]) -> Option<f64> {
    let mut xs = xs.to_vec();
    xs.sort_by(f64::total_cmp);
    (!xs.is_empty()).then(|| xs[xs.len() / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(s: &str) -> PlanList {
        parse_plan(s).unwrap()
    }

    #[test]
    fn markers_parse_into_steps() {
        let serial = "@@ step 3-1 add-layer a-3-1 plan=base:a up=10.5\r\n\
            @@ ok 3-1 add-layer plan=a-3-1:t,base:a staging= up=11.25\r\n\
            @@ step 3-1 compact a-3-1 b-3-1 c-3-1 plan=b-3-1:a,a-3-1:a,base:a up=12.00\n\
            @@ ok 3-1 comp";
        let steps = steps(serial).unwrap();
        assert_eq!(steps.len(), 2);
        assert_eq!(
            steps[0].done.as_ref().unwrap().after,
            plan("a-3-1:t,base:a")
        );
        assert_eq!(steps[1].args, ["a-3-1", "b-3-1", "c-3-1"]);
        assert!(steps[1].done.is_none(), "a line cut short is no marker");
        assert_eq!(model(&steps[1]).unwrap(), plan("c-3-1:a,base:a"));
    }

    #[test]
    fn a_cut_step_allows_the_plan_before_or_after_and_a_returned_checkpoint_must_freeze() {
        let serial = "@@ step 2-1 checkpoint cp-2-1 plan=base:a up=1\n\
            @@ ok 2-1 checkpoint plan=base:a staging= up=2\n\
            @@ step 2-1 remove x plan=base:a up=3\n";
        let e = Expect::exactly(plan("base:a"))
            .after(Some(&plan("base:a")), &steps(serial).unwrap())
            .unwrap_err();
        assert!(e.contains("the plan has no x"), "{e}");

        let serial = "@@ step 2-1 checkpoint cp-2-1 plan=x:a,base:a up=1\n\
            @@ ok 2-1 checkpoint plan=x:a,base:a staging= up=2\n\
            @@ step 2-1 remove x plan=x:a,base:a up=3\n";
        let next = Expect::exactly(plan("base:a"))
            .after(Some(&plan("x:a,base:a")), &steps(serial).unwrap())
            .unwrap();
        assert!(next.check(&plan("cp-2-1:a,base:a")).is_ok());
        assert!(next.check(&plan("cp-2-1:a,x:a,base:a")).is_ok());
        assert!(next.check(&plan("x:a,base:a")).is_err(), "the checkpoint");
        assert!(next.check(&plan("cp-2-1:a,y:a,base:a")).is_err());
    }

    #[test]
    fn trial_layers_may_be_disabled_by_a_boot_but_nothing_else_changes() {
        let e = Expect::exactly(plan("a:t,b:a,base:a"));
        assert!(e.check(&plan("a:d,b:a,base:a")).is_ok());
        assert!(e.check(&plan("a:t,b:d,base:a")).is_err());
        assert!(e.check(&plan("a:a,b:a,base:a")).is_err());
    }

    #[test]
    fn the_rng_replays_a_seed() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        assert_eq!(
            (0..5).map(|_| a.next_u64()).collect::<Vec<_>>(),
            (0..5).map(|_| b.next_u64()).collect::<Vec<_>>()
        );
        assert!((0..1000).all(|_| a.unit() < 1.0 && a.below(7) < 7));
    }
}
