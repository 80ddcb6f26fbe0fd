//! Real power cuts: a Strata store on a QEMU guest's disk, changed in a loop inside the guest
//! (add-layer, sync, a signed bundle, accept, compact, checkpoint, remove), and QEMU killed
//! with SIGKILL at seeded random moments, so whatever the guest had not written out of its page
//! cache is lost, as in a power cut (an in-process abort keeps the page cache). After each cut
//! the next boot runs the hook's recovery, and the guest's init prints what it found; the test
//! checks that the plan names the stack before or after the step that was cut (a step whose
//! `ok` was seen must be the stack after it, and a checkpoint whose command returned must be
//! frozen on top), that every layer it names is there and verifies, that the system reached
//! the test's init without falling back, and that the next change (the boot's accept, as the
//! accept unit does) succeeds and leaves nothing Strata named in `staging/`. Then the loop goes
//! on in that boot until the next cut.
//!
//! `STRATA_POWERCUT_SEED=N` replays a run's choices (the seed is printed first; timings under
//! TCG still vary), `STRATA_POWERCUT_CUTS=N` sets how many cuts (20 by default).
//!
//! **The disk's cache mode.** The harness's drive (`vm::qemu`) has QEMU's default,
//! `cache=writeback`, which is the right one here: the guest sees a volatile write cache (its
//! `/sys/block/vda/queue/write_cache` says `write back`, checked below), so its ext4 and
//! Strata's fsyncs send flushes as they would to a real disk, and QEMU honours each flush with
//! an fdatasync. What a SIGKILL of QEMU loses is the guest's memory (its page cache, dirty
//! buffers, journal transactions not yet written) and the requests QEMU had not yet written:
//! everything the guest had not written out, which is what a power cut loses. Whatever QEMU
//! had already written to the image is in the host's page cache and survives the kill in every
//! cache mode (the host does not crash), so no mode loses more on a kill; `cache=unsafe`,
//! which drops flushes, would survive a kill the same way but would be wrong the moment the
//! host itself went down; `directsync`/`writethrough` would hide the write cache from the
//! guest, so its flush paths would go untested; `cache=none` would do as well as `writeback`
//! but needs O_DIRECT on the filesystem that holds the image. A disk that reorders or drops
//! writes it acknowledged but the guest had not flushed is not modelled: that needs a block
//! device of the test's own between QEMU and the image.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use layers_spec::{BootState, Booted, UpperMode};
use tempfile::TempDir;
use tests::have_root;
use tests::powercut::{self, Expect, PlanList, Rng, Step};
use tests::vm::{self, BootLog, Kernel, Session};

/// Where a cut is aimed: the boot (from the hook's start to the end of the init's checks and
/// the accept after them), or a kind of step of the guest's loop.
const TARGETS: [&str; 8] = [
    "boot",
    "add-layer",
    "sync",
    "bundle",
    "accept",
    "compact",
    "checkpoint",
    "remove",
];

/// The disk: the store at /strata, the trees and the bundle at /powercut.
const DISK_MIB: u32 = 192;

struct Machine {
    _dir: TempDir,
    kernel: Kernel,
    initrd: PathBuf,
    image: PathBuf,
}

/// Builds the trees, the store (base layer, trusted key, a plan that boots without waiting
/// for a key and keeps only 8 MiB free on this small disk), the bundle, and the disk image.
fn machine() -> Machine {
    vm::ensure_packages();
    let kernel = vm::kernel();
    let dir = tempfile::tempdir_in(powercut::target_dir()).unwrap();
    let path = |rel: &str| dir.path().join(rel);
    let initrd = path("initrd.img");
    vm::initramfs(&kernel, &vm::static_hook(), &initrd);

    powercut::base_tree(&path("base"), &vm::static_overlayctl());
    let data = path("disk/powercut");
    powercut::layer_tree(&data.join("layer"));
    powercut::sync_tree(&path("base"), &data.join("S"));
    powercut::bundle_tree(&data.join("S"), &path("U"));

    let store = path("disk/strata");
    let ctl = |args: &[&str]| tests::overlayctl(&store, args);
    ctl(&["init", "--base", path("base").to_str().unwrap()]);
    let key = path("build.key");
    ctl(&["keys", "generate", "-o", key.to_str().unwrap()]);
    let public = format!("{}.pub", key.display());
    ctl(&["keys", "add", &public, "--name", "build"]);
    let bundle = data.join("S-U.bundle");
    let made = ctl(&[
        "bundle",
        "create",
        "--from",
        data.join("S").to_str().unwrap(),
        "--to",
        path("U").to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
        "--sign",
        key.to_str().unwrap(),
    ]);
    assert!(made.contains("1 as binary diffs"), "{made}");
    let plan_file = store.join("overlayplan.toml");
    let plan = std::fs::read_to_string(&plan_file).unwrap();
    let plan = plan
        .replace("menu = \"on-key\"", "menu = \"never\"")
        .replace("min_free = \"512MiB\"", "min_free = \"8MiB\"");
    assert!(
        plan.contains("\"never\"") && plan.contains("\"8MiB\""),
        "{plan}"
    );
    std::fs::write(&plan_file, plan).unwrap();
    ctl(&["check"]);

    let image = path("disk.img");
    vm::disk_image(&path("disk"), &image, DISK_MIB);
    Machine {
        _dir: dir,
        kernel,
        initrd,
        image,
    }
}

/// The console up to its last complete line (the rest may be cut short by the kill).
fn complete_lines(serial: &str) -> &str {
    serial.rfind('\n').map_or("", |end| &serial[..=end])
}

/// The lines between `@@ NAME-begin` and `@@ NAME-end`, `\r` removed.
fn block(log: &BootLog, name: &str) -> Result<String, String> {
    log.block(name)
        .ok_or_else(|| format!("no complete @@ {name} block on the console"))
}

/// What a boot's checks found, checked against what the store may hold.
struct Checked {
    plan: PlanList,
    cp_note: Option<String>,
}

/// Checks the console of a boot that got through its checks (`@@ checks-done`).
fn check_boot(serial: &str, expect: &Expect, steps: &[Step]) -> Result<Checked, String> {
    let log = BootLog {
        serial: serial.to_owned(),
        timed_out: false,
    };
    if log.marker("write-cache") != Some("write back") {
        return Err(format!(
            "the guest's disk shows write_cache {:?}, not \"write back\": flushes would go untested",
            log.marker("write-cache")
        ));
    }
    let booted =
        Booted::parse(&block(&log, "booted")?, "booted.toml").map_err(|e| e.to_string())?;
    if let Some(why) = &booted.fallback {
        return Err(format!("the boot fell back: {why}"));
    }
    if booted.upper != UpperMode::Persistent {
        return Err("the boot did not mount the persistent upper".into());
    }
    let state = BootState::parse(&block(&log, "state")?, "boot.toml").map_err(|e| e.to_string())?;
    let frozen = match &state.checkpoint {
        Some(c) if !c.frozen => {
            return Err(format!(
                "the checkpoint {} is still pending after a boot: the hook did not freeze it",
                c.layer
            ));
        }
        Some(c) => Some(c.layer.clone()),
        None => None,
    };
    let plan = powercut::parse_plan(log.marker("plan").unwrap_or(""))?;
    expect.check(&plan)?;
    // The hook clears what an interrupted change left in staging/ before it mounts anything.
    let staged = log.marker("staging-at-boot").unwrap_or("");
    if let Some(name) = staged.split(',').find(|n| n.starts_with("strata.")) {
        return Err(format!("staging/ holds {name} after the boot"));
    }
    let dirs: Vec<&str> = log.marker("layers").unwrap_or("").split(',').collect();
    if let Some((half, _)) = plan.iter().find(|(n, _)| !dirs.contains(&n.as_str())) {
        return Err(format!(
            "the plan names {half}, which has no directory in layers/"
        ));
    }
    // Every layer verifies; the one exception is a checkpoint this boot froze, whose digest
    // the next change writes.
    let verify = block(&log, "verify")?;
    for (name, _) in &plan {
        let ok = verify.lines().any(|l| l == format!("{name}: ok"));
        let unsealed = frozen.as_ref() == Some(name)
            && verify.lines().any(|l| {
                l == format!("{name}: the plan records no digest for it, so it cannot be verified")
            });
        if !ok && !unsealed {
            return Err(format!("overlayctl verify does not pass {name}:\n{verify}"));
        }
    }
    let stray: Vec<&str> = verify
        .lines()
        .filter(|l| !l.ends_with(": ok"))
        .filter(|l| {
            !frozen
                .as_ref()
                .is_some_and(|f| l.starts_with(&format!("{f}: ")))
        })
        .filter(|l| {
            !frozen
                .as_ref()
                .is_some_and(|f| l.ends_with(&format!("failed verification: {f}")))
        })
        .collect();
    if !stray.is_empty() || (log.marker("verified") != Some("0") && frozen.is_none()) {
        return Err(format!("overlayctl verify:\n{verify}"));
    }
    // The next change: the boot's accept.
    let accept = steps
        .first()
        .filter(|s| s.kind == "accept" && s.t.ends_with("-0"))
        .and_then(|s| s.done.as_ref())
        .ok_or("the accept after the boot did not complete")?;
    if let Some(name) = accept.staging.iter().find(|n| n.starts_with("strata.")) {
        return Err(format!(
            "staging/ holds {name} after the accept after the boot"
        ));
    }
    let verify = block(&log, "verify2")?;
    if log.marker("verified2") != Some("0") || verify.lines().any(|l| !l.ends_with(": ok")) {
        return Err(format!(
            "overlayctl verify after the first change:\n{verify}"
        ));
    }
    // Nothing left behind: once a change has run, layers/ holds only what the plan, the plan
    // before it or the running stack names (the journal deleted the rest), and uppers/ only
    // the running upper.
    let after: Vec<&str> = log
        .marker("after-accept")
        .unwrap_or("")
        .split(' ')
        .collect();
    let list = |key: &str| -> Vec<String> {
        after
            .iter()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or("")
            .split(',')
            .filter(|n| !n.is_empty())
            .map(|n| n.split(':').next().unwrap_or(n).to_owned())
            .collect()
    };
    let named = |n: &String| {
        plan.iter().any(|(p, _)| p == n) || list("prev=").contains(n) || booted.stack.contains(n)
    };
    if let Some(left) = list("layers=").iter().find(|n| !named(n)) {
        return Err(format!(
            "layers/{left} is still there after the first change, though neither the plan, its previous copy nor the running stack names it"
        ));
    }
    let uppers = list("uppers=");
    if uppers.iter().any(|u| booted.upper_id.as_ref() != Some(u)) {
        return Err(format!(
            "uppers/ holds {uppers:?} after the first change; the running upper is {:?}",
            booted.upper_id
        ));
    }
    Ok(Checked {
        plan,
        cp_note: log.marker("cp-note").map(str::to_owned),
    })
}

/// Where a cut landed, from the steps the console showed before it.
fn landed(serial: &str, steps: &[Step]) -> String {
    match steps.last() {
        None if serial.contains("@@ init ") => "boot: the init's checks".into(),
        None => "boot: the hook, before the init".into(),
        Some(s) => {
            let kind = if s.t.ends_with("-0") {
                "the boot's accept"
            } else {
                s.kind.as_str()
            };
            match s.done {
                None => format!("during {kind}"),
                Some(_) => format!("just after {kind} returned"),
            }
        }
    }
}

/// One run: its choices, what it saw, and the evidence a failure prints.
struct Run {
    seed: u64,
    rng: Rng,
    machine: Machine,
    expect: Expect,
    /// Step durations by kind (guest seconds), and boot times (from the hook's start to the
    /// end of the init's checks).
    durations: BTreeMap<String, Vec<f64>>,
    boot_secs: Vec<f64>,
    history: Vec<String>,
    landed: BTreeMap<String, usize>,
    notes: BTreeMap<String, usize>,
    previous_serial: String,
    /// The checkpoints asked for, and whether `overlayctl checkpoint` returned before the cut.
    checkpoints: BTreeMap<String, bool>,
}

impl Run {
    fn fail(&self, boot: usize, why: &str, serial: &str) -> ! {
        panic!(
            "power cut test failed at boot {boot} (seed {seed}; rerun with STRATA_POWERCUT_SEED={seed}): {why}\n\n\
             what the store may hold: {expect:?}\n\ncuts so far:\n{history}\n\n\
             ---- the previous boot's console ----\n{prev}\n---- this boot's console ----\n{serial}",
            seed = self.seed,
            expect = self.expect,
            history = self.history.join("\n"),
            prev = self.previous_serial,
        )
    }

    fn median_duration(&self, kind: &str) -> f64 {
        powercut::median(self.durations.get(kind).map_or(&[][..], Vec::as_slice)).unwrap_or(1.0)
    }

    fn record_durations(&mut self, steps: &[Step]) {
        for step in steps {
            if let Some(done) = &step.done {
                self.durations
                    .entry(step.kind.clone())
                    .or_default()
                    .push(done.up - step.up);
            }
        }
    }

    /// Boots once; unless this is the last boot, cuts the power as the seed says. Returns when
    /// the power is off.
    fn boot(&mut self, boot: usize, cut: bool) {
        // Drawn every boot, whatever the target, so a seed replays the same sequence.
        let target = TARGETS[self.rng.below(TARGETS.len() as u64) as usize];
        let iteration = if self.rng.unit() < 0.3 { 2 } else { 1 };
        let fraction = self.rng.unit();
        let m = &self.machine;
        // no_timer_check: under TCG on a loaded host the kernel's check of the IO-APIC timer
        // now and then fails and panics the boot ("IO-APIC + timer doesn't work"; seen once in
        // 11 boots here), and a virtual machine's timer needs no such check.
        let cmdline = format!("pc.boot={boot} no_timer_check");
        let mut session = Session::start(&m.kernel, &m.initrd, &m.image, &cmdline);
        // A boot is cut between the hook's start and the end of the init's checks: the hook's
        // recovery (a checkpoint's freeze, the journal, staging) and the accept after it.
        if session.wait_for("strata: starting").is_none() {
            let serial = session.serial();
            self.fail(boot, "the hook did not start", &serial);
        }
        let hook_started = Instant::now();
        if cut && target == "boot" {
            let median = powercut::median(&self.boot_secs).unwrap_or(4.0);
            let delay = fraction * median;
            std::thread::sleep(Duration::from_secs_f64(delay));
            self.cut(boot, session, format!("the boot + {delay:.2}s"));
            return;
        }
        if session.wait_for("@@ checks-done").is_none() {
            let serial = session.serial();
            self.fail(boot, "the boot did not get through its checks", &serial);
        }
        self.boot_secs.push(hook_started.elapsed().as_secs_f64());
        let serial = session.serial();
        let text = complete_lines(&serial);
        let steps = powercut::steps(text).unwrap_or_else(|e| self.fail(boot, &e, &serial));
        let checked =
            check_boot(text, &self.expect, &steps).unwrap_or_else(|e| self.fail(boot, &e, &serial));
        if let Some(note) = &checked.cp_note {
            let (name, content) = note.split_once(' ').unwrap_or((note, ""));
            let how = match content {
                c if c == format!("note {}", name.trim_start_matches("cp-")) => "intact",
                "missing" => "missing",
                "empty" => "empty",
                _ => "other",
            };
            let command = match self.checkpoints.get(name) {
                Some(true) => "its command had returned",
                Some(false) => "the cut came during its command",
                None => "its command was not seen",
            };
            *self
                .notes
                .entry(format!(
                    "a frozen checkpoint's note, written just before it was asked for: {how} ({command})"
                ))
                .or_default() += 1;
        }
        self.expect = Expect::exactly(checked.plan);
        if !cut {
            return;
        }
        // The step to cut: its marker, then a random part of how long that kind takes (up to
        // 1.3 times, so some cuts land just after it returned).
        let mark = format!("@@ step {boot}-{iteration} {target} ");
        if session.wait_for(&mark).is_none() {
            let serial = session.serial();
            self.fail(boot, &format!("the loop never reached {mark:?}"), &serial);
        }
        let delay = fraction * 1.3 * self.median_duration(target);
        std::thread::sleep(Duration::from_secs_f64(delay));
        self.cut(
            boot,
            session,
            format!("{target} of iteration {iteration} + {delay:.2}s"),
        );
    }

    /// Kills QEMU (SIGKILL: nothing the guest had not written out survives) and works out what
    /// the next boot may find.
    fn cut(&mut self, boot: usize, session: Session, aim: String) {
        let serial = session.serial();
        drop(session);
        let text = complete_lines(&serial);
        let steps = powercut::steps(text).unwrap_or_else(|e| self.fail(boot, &e, &serial));
        for step in &steps {
            let strata = step
                .done
                .iter()
                .flat_map(|d| &d.staging)
                .find(|n| n.starts_with("strata."));
            if let Some(name) = strata {
                self.fail(
                    boot,
                    &format!(
                        "staging/ holds {name} after step {} {} returned",
                        step.t, step.kind
                    ),
                    &serial,
                );
            }
        }
        if text.contains("@@ fail ") {
            self.fail(boot, "a step failed", &serial);
        }
        self.record_durations(&steps);
        for step in steps.iter().filter(|s| s.kind == "checkpoint") {
            if let Some(name) = step.args.first() {
                self.checkpoints.insert(name.clone(), step.done.is_some());
            }
        }
        // The plan the boot printed, once the line after it came (so it is whole).
        let log = BootLog {
            serial: text.to_owned(),
            timed_out: false,
        };
        let printed = log
            .marker("layers")
            .and(log.marker("plan"))
            .map(powercut::parse_plan)
            .transpose()
            .unwrap_or_else(|e| self.fail(boot, &e, &serial));
        if let Some(plan) = &printed
            && let Err(e) = self.expect.check(plan)
        {
            self.fail(boot, &e, &serial);
        }
        self.expect = self
            .expect
            .after(printed.as_ref(), &steps)
            .unwrap_or_else(|e| self.fail(boot, &e, &serial));
        let mut landed = landed(text, &steps);
        if steps.is_empty() && !self.expect.checkpoints.is_empty() {
            landed.push_str(if text.contains("froze upper") {
                ", after the hook froze a checkpoint"
            } else if self.expect.checkpoint_required {
                ", with a checkpoint to freeze"
            } else {
                ", with a checkpoint maybe to freeze"
            });
        }
        let line = format!("boot {boot}: aimed at {aim}; landed {landed}");
        eprintln!("vm_power_cut: {line}");
        self.history.push(line);
        *self.landed.entry(landed).or_default() += 1;
        self.previous_serial = serial;
    }
}

#[test]
fn vm_power_cuts_leave_the_old_or_the_new_stack() {
    if !have_root("vm_power_cuts_leave_the_old_or_the_new_stack") {
        return;
    }
    let (seed, cuts) = (powercut::seed(), powercut::cuts());
    eprintln!(
        "vm_power_cut: seed {seed}, {cuts} cuts (replay: STRATA_POWERCUT_SEED={seed} STRATA_POWERCUT_CUTS={cuts})"
    );
    let started = Instant::now();
    let mut run = Run {
        seed,
        rng: Rng::new(seed),
        machine: machine(),
        expect: Expect::exactly(vec![("base".into(), 'a')]),
        durations: BTreeMap::new(),
        boot_secs: Vec::new(),
        history: Vec::new(),
        landed: BTreeMap::new(),
        notes: BTreeMap::new(),
        previous_serial: String::new(),
        checkpoints: BTreeMap::new(),
    };
    let setup = started.elapsed();
    eprintln!("vm_power_cut: set up in {:.0}s", setup.as_secs_f64());
    for boot in 1..=cuts {
        run.boot(boot, true);
    }
    // And the boot after the last cut, checked like the others.
    run.boot(cuts + 1, false);

    let mut report = format!(
        "vm_power_cut: seed {seed}: {cuts} cuts, all recovered ({:.0}s, of which setup {:.0}s)\n",
        started.elapsed().as_secs_f64(),
        setup.as_secs_f64()
    );
    for (landed, n) in &run.landed {
        let _ = writeln!(report, "  {n:4}  {landed}");
    }
    for (note, n) in &run.notes {
        let _ = writeln!(report, "  {n:4}  {note}");
    }
    let _ = writeln!(
        report,
        "  median seconds: the hook's start to the end of the checks {:.1}; {}",
        powercut::median(&run.boot_secs).unwrap_or(0.0),
        run.durations
            .keys()
            .map(|k| format!("{k} {:.2}", run.median_duration(k)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    eprint!("{report}");
}
