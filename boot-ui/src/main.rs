use std::process::ExitCode;

fn main() -> ExitCode {
    match boot_ui::cli::run(std::env::args_os()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("boot-ui: {e:#}");
            ExitCode::FAILURE
        }
    }
}
