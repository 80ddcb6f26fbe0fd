//! Writes the package's man pages (section 8, one per command and subcommand) and the bash,
//! zsh and fish completions of `overlayctl`, `initramfs-hook` and `boot-ui`, from their clap
//! definitions, into `OUT/man8` and `OUT/completions/{bash,zsh,fish}`.

use std::fs;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let out = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .ok_or("usage: strata-docs OUT")?;
    for command in [
        overlayctl::Cli::command(),
        initramfs_hook::Cli::command(),
        boot_ui::cli::Opts::command(),
    ] {
        let name = command.get_name().to_owned();
        man_pages(&command, &name, &out.join("man8"))?;
        for (shell, dir, file) in [
            (Shell::Bash, "bash", name.clone()),
            (Shell::Zsh, "zsh", format!("_{name}")),
            (Shell::Fish, "fish", format!("{name}.fish")),
        ] {
            let dir = out.join("completions").join(dir);
            fs::create_dir_all(&dir)?;
            let mut text = Vec::new();
            clap_complete::generate(shell, &mut command.clone(), &name, &mut text);
            fs::write(dir.join(file), text)?;
        }
    }
    Ok(())
}

/// `NAME.8`, and `NAME-SUB.8` for each subcommand, recursively (`words` is how it is typed:
/// `overlayctl bundle create`).
fn man_pages(command: &clap::Command, words: &str, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)?;
    // clap takes static names here; a generator that runs once can spare them.
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let name = leak(words.replace(' ', "-"));
    let command = command
        .clone()
        .name(name)
        .bin_name(leak(words.to_owned()))
        .version(env!("CARGO_PKG_VERSION"));
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone())
        .section("8")
        .render(&mut page)?;
    fs::write(dir.join(format!("{name}.8")), page)?;
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        man_pages(sub, &format!("{words} {}", sub.get_name()), dir)?;
    }
    Ok(())
}
