//! `oxvirt`: one binary, one subcommand per tool. Each subcommand module only
//! parses arguments, calls into a library crate and prints the result.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cloud_localds;
mod daemon;
mod img;
mod lb;
mod libm_shim;
mod virsh;
mod vmm;

#[derive(Parser)]
#[command(
    name = "oxvirt",
    version,
    about = "A virtualization host: images, VMM, load balancer, manager"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// qemu-img compatible image tool.
    Img(img::Args),
    /// nginx-stream compatible L4 load balancer.
    Lb(lb::Args),
    /// KVM virtual machine monitor: one VM in the foreground.
    Vmm(vmm::Args),
    /// The manager daemon (oxvirtd): domains, VMM processes, cgroups, REST API.
    Daemon(daemon::Args),
    /// cloud-localds: a cloud-init NoCloud seed image (ISO 9660, label cidata).
    CloudLocalds(cloud_localds::Args),
    #[command(flatten)]
    Virsh(virsh::Verb),
}

fn main() -> ExitCode {
    let result = match vmm::args_alone() {
        Some(args) => vmm::run(args),
        None => match Cli::parse_from(virsh::connect_after_verb(std::env::args_os().collect()))
            .command
        {
            Command::Img(args) => img::run(args),
            Command::Lb(args) => lb::run(args),
            Command::Vmm(args) => vmm::run(args),
            Command::Daemon(args) => daemon::run(args),
            Command::CloudLocalds(args) => cloud_localds::run(args),
            Command::Virsh(verb) => virsh::run(verb),
        },
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("oxvirt: {}", describe(&err));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes on one line; a cause whose text the message
/// already holds (most of ours say "{path}: {source}") is not repeated.
fn describe(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}
