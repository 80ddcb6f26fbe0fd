//! `initramfs-hook mkinitramfs`: a minimal initramfs whose `/init` is this binary, with the
//! kernel modules asked for and their dependencies (from `modules.dep`, in load order), and
//! optionally busybox for an emergency shell. A newc cpio, gzip-compressed or not.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cpio::NewcBuilder;
use cpio::newc::ModeFileType;

/// Where the initramfs keeps its modules and their load order.
pub const MODULES_DIR: &str = "lib/modules";
pub const MODULES_LIST: &str = "etc/strata/modules";

/// What goes into the image.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// This binary (or another build of it), installed as `/init`.
    pub init: PathBuf,
    /// `lib/modules/<version>` of the kernel to boot, with `modules.dep`.
    pub modules_dir: Option<PathBuf>,
    /// Module names (`virtio_blk`, `ext4`, `overlay`…); dependencies are added.
    pub modules: Vec<String>,
    /// A static busybox, installed as `/bin/busybox` with `/bin/sh`, for the emergency shell.
    pub busybox: Option<PathBuf>,
    pub gzip: bool,
}

/// The module's name as the kernel knows it: file stem with `-` as `_`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// The modules to load, dependencies first, as paths relative to `modules_dir`.
pub fn resolve_modules(modules_dir: &Path, wanted: &[String]) -> Result<Vec<String>> {
    let dep_file = modules_dir.join("modules.dep");
    let text = fs::read_to_string(&dep_file).with_context(|| {
        format!(
            "reading {} (run `depmod -b ROOT VERSION` to make it)",
            dep_file.display()
        )
    })?;
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in text.lines() {
        let Some((module, rest)) = line.split_once(':') else {
            continue;
        };
        let rest: Vec<String> = rest.split_whitespace().map(str::to_owned).collect();
        deps.insert(module_name(module), (module.to_owned(), rest));
    }
    let builtin: BTreeSet<String> = fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_name)
        .collect();

    fn visit(
        name: &str,
        deps: &BTreeMap<String, (String, Vec<String>)>,
        order: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) {
        if !seen.insert(name.to_owned()) {
            return;
        }
        let Some((path, needs)) = deps.get(name) else {
            return;
        };
        for need in needs {
            visit(&module_name(need), deps, order, seen);
        }
        order.push(path.clone());
    }
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for name in wanted {
        let name = name.replace('-', "_");
        if deps.contains_key(&name) {
            visit(&name, &deps, &mut order, &mut seen);
        } else if !builtin.contains(&name) {
            bail!(
                "module {name} is neither in {} nor built into the kernel",
                dep_file.display()
            );
        }
    }
    if let Some(compressed) = order.iter().find(|p| !p.ends_with(".ko")) {
        bail!("{compressed} is compressed; this initramfs loads plain .ko files only");
    }
    Ok(order)
}

struct Archive {
    entries: Vec<(NewcBuilder, Cursor<Vec<u8>>)>,
}

impl Archive {
    fn dir(&mut self, path: &str) {
        self.entries.push((
            NewcBuilder::new(path)
                .mode(0o755)
                .set_mode_file_type(ModeFileType::Directory),
            Cursor::new(Vec::new()),
        ));
    }

    fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        self.entries.push((
            NewcBuilder::new(path)
                .mode(mode)
                .set_mode_file_type(ModeFileType::Regular),
            Cursor::new(data),
        ));
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.entries.push((
            NewcBuilder::new(path)
                .mode(0o777)
                .set_mode_file_type(ModeFileType::Symlink),
            Cursor::new(target.as_bytes().to_vec()),
        ));
    }

    fn char_device(&mut self, path: &str, major: u32, minor: u32) {
        self.entries.push((
            NewcBuilder::new(path)
                .mode(0o600)
                .set_mode_file_type(ModeFileType::Char)
                .rdev_major(major)
                .rdev_minor(minor),
            Cursor::new(Vec::new()),
        ));
    }
}

/// Builds the image and writes it to `output`; returns the modules it holds, in load order.
pub fn build(spec: &ImageSpec, output: &Path) -> Result<Vec<String>> {
    let mut archive = Archive {
        entries: Vec::new(),
    };
    for dir in [
        "dev",
        "proc",
        "sys",
        "run",
        "sysroot",
        "newroot",
        "etc",
        "etc/strata",
        "lib",
        MODULES_DIR,
        "bin",
    ] {
        archive.dir(dir);
    }
    // The kernel opens /dev/console for /init before devtmpfs is mounted.
    archive.char_device("dev/console", 5, 1);
    let init = fs::read(&spec.init).with_context(|| format!("reading {}", spec.init.display()))?;
    archive.file("init", 0o755, init);

    let mut loaded = Vec::new();
    if let Some(dir) = &spec.modules_dir {
        let order = resolve_modules(dir, &spec.modules)?;
        let mut list = String::new();
        for rel in &order {
            let file = rel.rsplit('/').next().unwrap_or(rel);
            let data = fs::read(dir.join(rel))
                .with_context(|| format!("reading {}", dir.join(rel).display()))?;
            archive.file(&format!("{MODULES_DIR}/{file}"), 0o644, data);
            list += file;
            list.push('\n');
            loaded.push(module_name(rel));
        }
        archive.file(MODULES_LIST, 0o644, list.into_bytes());
    } else if !spec.modules.is_empty() {
        bail!("--module needs --modules-dir (the kernel's lib/modules/VERSION)");
    }
    if let Some(busybox) = &spec.busybox {
        let data = fs::read(busybox).with_context(|| format!("reading {}", busybox.display()))?;
        archive.file("bin/busybox", 0o755, data);
        archive.symlink("bin/sh", "busybox");
    }

    let file =
        fs::File::create(output).with_context(|| format!("creating {}", output.display()))?;
    let write = |out: Box<dyn Write>| cpio::write_cpio(archive.entries.into_iter(), out);
    if spec.gzip {
        let encoder = flate2::write::GzEncoder::new(file, flate2::Compression::default());
        let mut encoder = write(Box::new(encoder)).context("writing the archive")?;
        encoder.flush()?;
    } else {
        write(Box::new(file)).context("writing the archive")?;
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_come_with_their_dependencies_first() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("modules.dep"),
            "kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko\n\
             kernel/fs/jbd2/jbd2.ko:\nkernel/fs/mbcache.ko:\nkernel/lib/crc16.ko:\n\
             kernel/fs/overlayfs/overlay.ko:\n\
             kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio-ring.ko\n\
             kernel/drivers/virtio/virtio-ring.ko:\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("modules.builtin"),
            "kernel/fs/squashfs/squashfs.ko\n",
        )
        .unwrap();
        let order = resolve_modules(
            dir.path(),
            &[
                "virtio-blk".into(),
                "ext4".into(),
                "overlay".into(),
                "squashfs".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            order,
            [
                "kernel/drivers/virtio/virtio-ring.ko",
                "kernel/drivers/block/virtio_blk.ko",
                "kernel/lib/crc16.ko",
                "kernel/fs/mbcache.ko",
                "kernel/fs/jbd2/jbd2.ko",
                "kernel/fs/ext4/ext4.ko",
                "kernel/fs/overlayfs/overlay.ko",
            ]
        );
        let err = resolve_modules(dir.path(), &["nope".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("module nope is neither in"), "{err}");
    }

    #[test]
    fn the_image_is_a_newc_archive_with_init_and_console() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("init"), b"#!binary").unwrap();
        let spec = ImageSpec {
            init: dir.path().join("init"),
            modules_dir: None,
            modules: vec![],
            busybox: None,
            gzip: false,
        };
        let image = dir.path().join("initrd");
        build(&spec, &image).unwrap();
        let mut reader = fs::File::open(&image).unwrap();
        let mut names = Vec::new();
        loop {
            let entry = cpio::NewcReader::new(reader).unwrap();
            if entry.entry().is_trailer() {
                break;
            }
            names.push((
                entry.entry().name().to_owned(),
                entry.entry().mode() & 0o170000,
                entry.entry().rdev_major(),
            ));
            reader = entry.finish().unwrap();
        }
        assert!(names.contains(&("init".into(), 0o100000, 0)));
        assert!(names.contains(&("dev/console".into(), 0o020000, 5)));
        assert!(names.iter().any(|(n, _, _)| n == "newroot"));
    }
}
