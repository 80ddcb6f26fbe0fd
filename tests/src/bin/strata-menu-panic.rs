//! For the terminal tests: takes the terminal the way the boot menu does, draws, then panics,
//! so the test can check that the panic still gives the terminal back.

fn main() {
    let _guard = boot_ui::term::RawGuard::enter(true).expect("a terminal");
    eprint!("menu drawn");
    std::thread::sleep(std::time::Duration::from_millis(500));
    panic!("a bug inside the menu");
}
