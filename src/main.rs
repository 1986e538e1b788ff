use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = outbound::cli::Cli::parse();
    if let Err(err) = outbound::cli::run(cli).await {
        eprintln!("error: {err:#}");
        std::process::exit(err.exit_code());
    }
}
