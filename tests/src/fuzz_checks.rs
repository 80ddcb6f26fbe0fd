//! The fuzz targets' bodies: for each parser, one function that parses an input and asserts what
//! must hold of the result, panicking when it does not. The targets in `fuzz/fuzz_targets/` call
//! these on every input libFuzzer makes, and `tests/tests/fuzz_corpus.rs` calls them on the
//! committed corpora on stable, so a crasher once found stays fixed.
//!
//! Text inputs are read as UTF-8 with invalid bytes replaced: the device reads every one of
//! these files with `read_to_string`, so only text reaches the parsers, and a lossy reading
//! lets every input the fuzzer makes be text.

use std::borrow::Cow;
use std::collections::HashSet;
use std::path::Path;

use layers_spec::plan::{MAX_STACK, MAX_TIMEOUT_S, is_valid_digest};
use layers_spec::resolve::Note;
use layers_spec::{
    BootOverrides, BootState, LayerState, Plan, PlanError, UpperMode, check_name, legacy, resolve,
};
use overlayctl::bundle::{Bundle, BundleHead, BundleManifest, PART_LIMIT, parse_secret};
use overlayctl::engine::manifest::{escape, unescape};

/// The name parsers are given for the file, which located errors must repeat.
const FILE: &str = "fuzz-input";

fn text(data: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(data)
}

/// An error about a file's content points into that file: its name, then a line and a column
/// that exist in `text`.
fn check_located(err: &PlanError, text: &str) {
    let message = err.to_string();
    let Some(at) = err.location() else {
        panic!("a parse error without a location: {message}");
    };
    assert_eq!(at.file, FILE, "the error names another file: {message}");
    let lines: Vec<&str> = text.split('\n').collect();
    assert!(
        (1..=lines.len()).contains(&at.line),
        "line {} of a {}-line text: {message}",
        at.line,
        lines.len()
    );
    let width = lines[at.line - 1].chars().count();
    assert!(
        (1..=width + 1).contains(&at.column),
        "column {} of a {width}-character line: {message}",
        at.column
    );
    assert!(
        message.starts_with(&format!("{at}: ")),
        "the message does not start with its location: {message}"
    );
}

/// What validation promises of every plan `Plan::parse` accepts, restated independently, and
/// that the plan is written as text that reads back as itself and is written again unchanged.
fn check_valid_plan(plan: &Plan) {
    assert_eq!(plan.version, 1);
    assert!((1..=MAX_STACK as usize).contains(&plan.layers.len()));
    assert!(plan.boot.timeout_s <= MAX_TIMEOUT_S);
    assert!(plan.boot.trial_boots >= 1);
    assert!((1..=MAX_STACK).contains(&plan.policy.max_layers));
    if let Some(lock) = &plan.boot.menu_lock {
        assert!(layers_spec::lock::check_hash(lock).is_ok(), "{lock:?}");
    }
    let mut names = HashSet::new();
    for (i, layer) in plan.layers.iter().enumerate() {
        assert!(check_name(&layer.name).is_ok(), "{:?}", layer.name);
        assert!(names.insert(&layer.name), "{:?} twice", layer.name);
        if let Some(parent) = &layer.parent {
            // Listed below it: which also rules out cycles and a layer on itself.
            assert!(
                plan.position(parent).is_some_and(|p| p > i),
                "{:?} on {parent:?}",
                layer.name
            );
        }
        if let Some(digest) = &layer.digest {
            assert!(is_valid_digest(digest), "{digest:?}");
        }
        if let Some(created) = &layer.created {
            assert!(created.date.is_some(), "{created}");
        }
        for name in &layer.replaces {
            assert!(check_name(name).is_ok(), "replaces {name:?}");
        }
    }
    let written = plan.check().unwrap_or_else(|e| {
        panic!("a plan that parsed does not pass its own check: {e}\n{plan:#?}")
    });
    let again = Plan::parse(&written, FILE).expect("checked");
    assert_eq!(
        again.to_toml().unwrap(),
        written,
        "written twice differently"
    );
}

/// `Plan::parse`: a plan it accepts satisfies every rule and round-trips (write, parse, equal);
/// an error is located in the text; a byte-order mark changes nothing; and resolving the plan for
/// a first boot gives a stack that partitions the plan with what is left out.
pub fn plan(data: &[u8]) {
    let text = text(data);
    let parsed = Plan::parse(&text, FILE);
    // One mark is read past; a text with one already would start with a second.
    if !text.starts_with('\u{feff}') {
        let with_bom = Plan::parse(&format!("\u{feff}{text}"), FILE);
        match (&parsed, &with_bom) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "a byte-order mark changed the plan"),
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
            _ => panic!("a byte-order mark changed the outcome: {parsed:?} / {with_bom:?}"),
        }
    }
    let plan = match parsed {
        Ok(plan) => plan,
        Err(e) => return check_located(&e, &text),
    };
    check_valid_plan(&plan);

    let resolution = resolve(
        &plan,
        &BootState::default(),
        &BootOverrides::default(),
        None,
    );
    let all: Vec<&String> = plan.layers.iter().map(|l| &l.name).collect();
    let stacked: Vec<&String> = all
        .iter()
        .copied()
        .filter(|n| resolution.stack.contains(n))
        .collect();
    assert_eq!(
        resolution.stack.iter().collect::<Vec<_>>(),
        stacked,
        "the stack is not plan layers in plan order, once each"
    );
    let left: Vec<&String> = resolution.left_out.iter().map(|l| &l.name).collect();
    let rest: Vec<&String> = all
        .iter()
        .copied()
        .filter(|n| !resolution.stack.contains(n))
        .collect();
    assert_eq!(left, rest, "stack and left-out do not partition the plan");
    if plan.layers.iter().any(|l| l.known_good) {
        assert!(
            !resolution.stack.is_empty(),
            "an empty stack with a known-good layer"
        );
    } else if resolution.stack.is_empty() {
        assert!(resolution.notes.contains(&Note::Empty));
    }
}

/// `BootState::parse`: a state it accepts names only valid layers and uppers (the hook makes
/// paths of them, and the store's journal deletes layers by name) and round-trips; an error is
/// located in the text.
pub fn state(data: &[u8]) {
    let text = text(data);
    let state = match BootState::parse(&text, FILE) {
        Ok(state) => state,
        Err(e) => return check_located(&e, &text),
    };
    assert_eq!(state.version, 1);
    let mut names: Vec<&String> = Vec::new();
    names.extend(&state.last_good);
    names.extend(&state.upper_stack);
    names.extend(state.trial_tries.keys());
    names.extend(&state.current_upper);
    names.extend(state.once.iter().flat_map(|o| &o.layers));
    names.extend(state.last_boot.iter().flat_map(|b| &b.layers));
    if let Some(checkpoint) = &state.checkpoint {
        names.extend([&checkpoint.layer, &checkpoint.upper]);
    }
    for archived in &state.archived_uppers {
        names.push(&archived.id);
        names.extend(&archived.layers);
    }
    names.extend(
        state
            .claimed
            .iter()
            .chain(&state.released)
            .map(|r| &r.layer),
    );
    for name in names {
        assert!(check_name(name).is_ok(), "{name:?} in {state:#?}");
    }
    let written = state
        .check()
        .unwrap_or_else(|e| panic!("a state that parsed does not pass its own check: {e}"));
    let again = BootState::parse(&written, FILE).expect("checked");
    assert_eq!(again, state);
    assert_eq!(
        again.to_toml().unwrap(),
        written,
        "written twice differently"
    );
}

/// `legacy::import`: an imported plan is valid and round-trips, keeps one layer per entry line
/// in order with nothing but a title and `ro` as `active`, and imports the same again when
/// written back as a legacy file; an error is located in the legacy file.
pub fn legacy(data: &[u8]) {
    let text = text(data);
    let plan = match legacy::import(&text, FILE) {
        Ok(plan) => plan,
        Err(e) => return check_located(&e, &text),
    };
    check_valid_plan(&plan);
    let defaults = Plan::new(Vec::new());
    assert_eq!(
        (&plan.boot, &plan.upper, &plan.policy),
        (&defaults.boot, &defaults.upper, &defaults.policy)
    );
    let entries: Vec<&str> = text
        .strip_prefix('\u{feff}')
        .unwrap_or(&text)
        .lines()
        .map(str::trim)
        .filter(|l| !(l.is_empty() || l.starts_with(['#', ';', '['])))
        .collect();
    assert_eq!(entries.len(), plan.layers.len(), "one layer per entry line");
    let mut rewritten = String::from("[Layers]\n");
    for (layer, line) in plan.layers.iter().zip(entries) {
        assert_eq!(line.split('=').next().map(str::trim), Some(&*layer.name));
        assert!(matches!(
            layer.state,
            LayerState::Active | LayerState::Trial
        ));
        let mut bare = layers_spec::Layer::new(layer.name.clone());
        bare.title = layer.title.clone();
        bare.state = layer.state;
        assert_eq!(layer, &bare, "an import sets more than title and state");
        assert_ne!(layer.title.as_deref(), Some(""));
        let title = layer.title.as_deref().unwrap_or("");
        let title = title.replace('\\', "\\\\").replace('"', "\\\"");
        let flag = if layer.state == LayerState::Active {
            ",ro"
        } else {
            ""
        };
        rewritten += &format!("{}=\"{title}\"{flag}\n", layer.name);
    }
    let again = legacy::import(&rewritten, FILE)
        .unwrap_or_else(|e| panic!("written back, it does not import: {e}\n{rewritten}"));
    assert_eq!(again, plan, "written back, it imports differently");
}

/// `BootOverrides::parse`: every value it keeps is usable (names valid, the store an absolute
/// path without `..`); each problem is about a `strata.` parameter; what it kept, written as a
/// command line, reads back the same without problems; parameters before it that are not ours,
/// and anything after `--`, change nothing.
pub fn cmdline(data: &[u8]) {
    let text = text(data);
    let (overrides, problems) = BootOverrides::parse(&text);
    for problem in &problems {
        assert!(problem.param.starts_with("strata."), "{problem}");
        assert!(problem.to_string().contains(&problem.param));
    }
    let names = overrides.top.iter().chain(&overrides.disable);
    for name in names {
        assert!(check_name(name).is_ok(), "{name:?}");
    }
    let unique: HashSet<&String> = overrides.disable.iter().collect();
    assert_eq!(
        unique.len(),
        overrides.disable.len(),
        "a layer disabled twice"
    );
    if let Some(store) = &overrides.store {
        assert!(store.starts_with('/') && !store.split('/').any(|c| c == ".."));
        assert!(!store.contains('"'), "quotes are never part of a value");
    }

    let mut line = format!(
        "strata.menu={} strata.debug={}",
        u8::from(overrides.menu),
        u8::from(overrides.debug)
    );
    if let Some(top) = &overrides.top {
        line += &format!(" strata.top={top}");
    }
    if !overrides.disable.is_empty() {
        line += &format!(" strata.disable={}", overrides.disable.join(","));
    }
    if let Some(upper) = overrides.upper {
        let mode = match upper {
            UpperMode::Tmpfs => "tmpfs",
            UpperMode::Persistent => "persistent",
        };
        line += &format!(" strata.upper={mode}");
    }
    if let Some(store) = &overrides.store {
        line += &format!(" \"strata.store={store}\"");
    }
    assert_eq!(
        BootOverrides::parse(&line),
        (overrides.clone(), Vec::new()),
        "written as {line:?}, it reads differently"
    );

    let same = (overrides, problems);
    let before = format!("BOOT_IMAGE=/vmlinuz root=/dev/vda ro quiet {text}");
    assert_eq!(
        BootOverrides::parse(&before),
        same,
        "other parameters matter"
    );
    if text.matches('"').count().is_multiple_of(2) {
        let after = format!("{text} -- strata.menu=maybe strata.top=../x");
        assert_eq!(
            BootOverrides::parse(&after),
            same,
            "init's arguments matter"
        );
    }
}

/// The secret of the key the fuzzer's gate trusts: a test key, only for this. Seed bundles in
/// `fuzz/corpus/bundle*` are signed with it (`overlayctl bundle create --sign` with this text
/// as the key file), so the fuzzer starts from bundles that pass the gate.
pub const TRUSTED_SECRET: &str =
    "strata-ed25519-secret WlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlo=\n";

/// What `Bundle::open` reads of a bundle file, run on bytes in memory (`BundleHead::read`, then
/// `check`, as `open` does), with the input as the whole file and as the start of a file whose
/// payload is all there. Checks that an accepted head is where it says in the bytes; that an
/// accepted bundle's entries are what rebuilding relies on (plain relative paths, each once,
/// under a directory made before, links to earlier files, no overlayfs attributes); that its
/// manifest, written as `bundle create` writes one, reads back as itself; and that the trust
/// gate lets through exactly the bundles a trusted key signed.
pub fn bundle(data: &[u8]) {
    let name = Path::new("fuzz.bundle");
    let len = data.len() as u64;
    let Ok(head) = BundleHead::read(name, data, len, None) else {
        return;
    };
    assert_eq!(head.manifest.version, 3);
    let manifest_len = head.manifest_bytes.len() as u64;
    assert_eq!(
        head.payload_start,
        8 + 8 + manifest_len + 4 + 96 * head.signatures.len() as u64
    );
    assert!(head.payload_start <= len);
    assert_eq!(&data[..8], b"STRATAB\x03");
    assert_eq!(data[8..16], manifest_len.to_le_bytes());
    assert_eq!(
        &data[16..16 + head.manifest_bytes.len()],
        head.manifest_bytes
    );

    let whole = head.clone().check(name, len);
    let Some(full) = head.payload_start.checked_add(head.manifest.payload) else {
        assert!(whole.is_err());
        return;
    };
    let opened = head.clone().check(name, full);
    match (&whole, &opened) {
        (Ok(_), Err(e)) => panic!("accepted with the payload it has, not with what it claims: {e}"),
        (Ok(_), Ok(_)) => assert_eq!(full, len),
        _ => {}
    }
    let trusted = vec![(
        "fuzz".to_owned(),
        parse_secret(TRUSTED_SECRET).unwrap().verifying_key(),
    )];
    let gated = BundleHead::read(name, data, len, Some(&trusted));
    if let Ok(gated) = &gated {
        assert_eq!(gated.manifest, head.manifest);
        assert_eq!(gated.signatures, head.signatures);
    }
    let Ok(bundle) = opened else {
        return;
    };
    let signed = !bundle.signed_by(&trusted).is_empty();
    assert_eq!(
        gated.is_ok(),
        signed,
        "the gate and the signatures disagree: {gated:?}"
    );
    check_bundle_entries(&bundle);
    check_bundle_parts(&bundle);

    // Written as `bundle create` writes it (JSON, compressed, no signature), it reads back.
    let text =
        serde_json::to_string(&bundle.manifest).expect("an accepted manifest can be written");
    let reread: BundleManifest =
        serde_json::from_str(&text).expect("a written manifest reads back");
    assert_eq!(reread, bundle.manifest);
    let packed = zstd::bulk::compress(text.as_bytes(), 1).unwrap();
    let mut bytes = b"STRATAB\x03".to_vec();
    bytes.extend((packed.len() as u64).to_le_bytes());
    bytes.extend(&packed);
    bytes.extend(0u32.to_le_bytes());
    let prefix = bytes.len() as u64;
    let again = BundleHead::read(name, bytes.as_slice(), prefix, None)
        .and_then(|h| h.check(name, prefix + bundle.manifest.payload))
        .unwrap_or_else(|e| panic!("rewritten, the bundle is refused: {e:#}"));
    assert_eq!(again.manifest, bundle.manifest);
}

/// `bundle` on a bundle made around `data` as its manifest text (compressed, unsigned): reaches
/// the manifest's TOML and the entry checks without the fuzzer having to make zstd frames.
pub fn bundle_manifest(data: &[u8]) {
    let packed = zstd::bulk::compress(data, 1).expect("compressing in memory");
    let mut bytes = b"STRATAB\x03".to_vec();
    bytes.extend((packed.len() as u64).to_le_bytes());
    bytes.extend(&packed);
    bytes.extend(0u32.to_le_bytes());
    bundle(&bytes);
}

/// What decompressing a bundle's parts relies on, restated from its use rather than from
/// `check_entries`: the parts lie end to end over the whole payload; a part held in memory is at
/// most `PART_LIMIT` bytes; each file's bytes lie inside its part's regions, a diff names its
/// basis (by a plain path when not its own), and a streamed part is one whole file.
fn check_bundle_parts(bundle: &Bundle) {
    let m = &bundle.manifest;
    let mut at = 0u64;
    for part in &m.parts {
        assert_eq!(part.offset, at, "parts end to end");
        at += part.length;
        assert!(
            part.stream || part.size() <= PART_LIMIT,
            "{part:?} too large"
        );
    }
    assert_eq!(at, m.payload, "the parts cover the payload");
    let inside = |at: u64, len: u64, region: u64| at.checked_add(len).is_some_and(|e| e <= region);
    for entry in &m.entries {
        let Some(data) = &entry.data else { continue };
        assert!(entry.size.is_some() && entry.hash.is_some(), "{entry:?}");
        if data.encoding == "basis" {
            assert!(data.length == 0 && data.from.is_none(), "{entry:?}");
            continue;
        }
        let part = &m.parts[data.part as usize];
        match data.encoding.as_str() {
            "whole" => {
                assert!(inside(data.offset, data.length, part.literals), "{entry:?}");
                if part.stream {
                    assert!(
                        data.offset == 0 && data.length == part.literals,
                        "{entry:?}"
                    );
                }
            }
            "bsdiff" => {
                assert!(!part.stream, "{entry:?}");
                assert!(inside(data.offset, data.length, part.controls), "{entry:?}");
                assert!(data.diff.is_some_and(|d| d <= part.diffs), "{entry:?}");
                assert!(data.extra.is_some_and(|x| x <= part.literals), "{entry:?}");
                assert!(data.basis.is_some(), "{entry:?}");
                if let Some(from) = &data.from {
                    let bytes = unescape(from);
                    assert!(
                        !bytes.is_empty()
                            && bytes
                                .split(|&b| b == b'/')
                                .all(|p| !p.is_empty() && p != b"." && p != b".."),
                        "{entry:?} is made from outside the tree"
                    );
                }
            }
            other => panic!("{entry:?}: accepted with encoding {other:?}"),
        }
    }
}

/// What rebuilding a bundle's layer relies on, restated from its use rather than from
/// `check_entries`: the root first, then plain relative paths, canonically escaped, each once,
/// each under a directory the bundle made before it; a second name links to an earlier file and
/// carries no content of its own; no entry sets overlayfs's attributes.
fn check_bundle_entries(bundle: &Bundle) {
    let mut dirs: HashSet<Vec<u8>> = HashSet::from([Vec::new()]);
    let mut seen = HashSet::new();
    let mut files = HashSet::new();
    for (i, entry) in bundle.manifest.entries.iter().enumerate() {
        let path = &entry.path;
        if path == "." {
            assert!(i == 0 && entry.kind == "dir", "root entry {i}");
            continue;
        }
        let bytes = unescape(path);
        assert_eq!(&escape(&bytes), path, "not canonical");
        let parts: Vec<&[u8]> = bytes.split(|&b| b == b'/').collect();
        assert!(
            parts
                .iter()
                .all(|p| !p.is_empty() && *p != b"." && *p != b".."),
            "{path:?} is not a plain relative path"
        );
        let parent = parts[..parts.len() - 1].join(&b'/');
        assert!(dirs.contains(&parent), "{path:?} is not under a made dir");
        assert!(seen.insert(bytes.clone()), "{path:?} twice");
        for key in entry.xattrs.keys() {
            let key = unescape(key);
            assert!(
                !key.starts_with(b"trusted.overlay.") && !key.starts_with(b"user.overlay."),
                "{path:?} sets {key:?}"
            );
        }
        match entry.kind.as_str() {
            "dir" => {
                dirs.insert(bytes);
            }
            "file" => {
                match &entry.link {
                    Some(first) => assert!(
                        files.contains(first) && entry.data.is_none(),
                        "{path:?} links to {first:?}"
                    ),
                    None => assert!(entry.data.is_some(), "{path:?} has no content"),
                }
                files.insert(path.clone());
            }
            _ => {}
        }
    }
}
