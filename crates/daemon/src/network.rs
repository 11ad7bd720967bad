//! Domains' NICs: the daemon's `default` NAT network (a bridge with the
//! gateway address and an nftables NAT table, like libvirt's virbr0) and
//! one persistent tap per NIC on that bridge, which the VMM opens by name.

use host::net::{Links, Nat, NatConfig, NatNetwork, NetError, Tap, TapConfig};

/// Tap names the kernel numbers (`oxvnet0`, `oxvnet1`, ...).
const TAP_PATTERN: &str = "oxvnet%d";

/// Starts the network unless its bridge is there already (a previous
/// daemon left it up, as libvirt leaves virbr0); then re-applies NAT, so a
/// flushed ruleset heals.
pub(crate) fn ensure(config: &NatConfig) -> Result<(), NetError> {
    let links = Links::host();
    if links.info(&config.bridge)?.is_some() {
        Nat::apply(config, None)?;
        return Ok(());
    }
    // The network outlives this call and the daemon: it is not stopped
    // when the daemon stops (libvirt's behaviour).
    NatNetwork::start(config, None)?;
    tracing::info!(bridge = config.bridge, address = %config.address, "started the default network");
    Ok(())
}

/// Creates `count` taps on the network's bridge; on failure none is left.
pub(crate) fn create_taps(config: &NatConfig, count: usize) -> Result<Vec<String>, NetError> {
    if count == 0 {
        return Ok(Vec::new());
    }
    ensure(config)?;
    let mut taps = Vec::with_capacity(count);
    for _ in 0..count {
        match create_tap(&config.bridge) {
            Ok(name) => taps.push(name),
            Err(e) => {
                delete_taps(&taps);
                return Err(e);
            }
        }
    }
    Ok(taps)
}

fn create_tap(bridge: &str) -> Result<String, NetError> {
    let tap = Tap::create(&TapConfig {
        name: TAP_PATTERN,
        persistent: true,
        ..TapConfig::default()
    })?;
    let name = tap.name().to_owned();
    // The persistent tap stays when our file closes; the VMM opens it.
    drop(tap);
    let links = Links::host();
    let attached = links
        .set_master(&name, bridge)
        .and_then(|()| links.set_up(&name));
    if let Err(e) = attached {
        delete_taps(std::slice::from_ref(&name));
        return Err(e);
    }
    Ok(name)
}

/// Deletes taps (a missing one is not an error: it is what we want).
pub(crate) fn delete_taps(taps: &[String]) {
    let links = Links::host();
    for tap in taps {
        match links.info(tap) {
            Ok(None) => {}
            _ => {
                if let Err(e) = links.delete(tap) {
                    tracing::warn!(tap, error = %e, "cannot delete tap");
                }
            }
        }
    }
}
