use clap::Parser;

fn main() {
    let cli = clx_pool::cli::Cli::parse();
    std::process::exit(clx_pool::run(cli));
}
