use clap::Parser;
use kvfs::cli::{expand_mount_args, Cli, Command};

fn main() {
    // mount(8) runs `kvfs SOURCE MOUNTPOINT -o OPTS` for fstab type fuse.kvfs; -o options of
    // `kvfs mount` become its long options. Both are rewritten before clap sees them.
    let argv = match expand_mount_args(std::env::args_os().collect()) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("kvfs: {e}");
            std::process::exit(2);
        }
    };
    let cli = Cli::parse_from(argv);
    let code = match cli.command {
        Command::Serve(args) => kvfs::server::run(args),
        Command::Mount(args) => kvfs::mount::mount(args),
        Command::Unmount(args) => kvfs::mount::unmount(args),
        Command::Status(args) => kvfs::mount::status(args),
        Command::Generate(args) => kvfs::cli::generate(args),
    };
    std::process::exit(code);
}
