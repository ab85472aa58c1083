use clap::Parser;
use kvfs::cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Serve(args) => kvfs::server::run(args),
        Command::Mount(_) | Command::Unmount(_) | Command::Status(_) => {
            eprintln!("kvfs: not implemented yet");
            2
        }
    };
    std::process::exit(code);
}
