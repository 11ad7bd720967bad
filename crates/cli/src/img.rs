//! `oxvirt img`: qemu-img's arguments, output and exit codes.

/// qemu-img compatible image tool.
#[derive(clap::Args)]
pub struct Args {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    rest: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    anyhow::bail!("img: no verb implemented yet ({:?})", args.rest)
}
