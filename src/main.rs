use clap::Parser;
use kvfs::cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Serve(args) => kvfs::server::run(args),
        Command::Mount(args) => kvfs::mount::mount(args),
        Command::Unmount(args) => kvfs::mount::unmount(args),
        Command::Status(args) => kvfs::mount::status(args),
    };
    std::process::exit(code);
}
