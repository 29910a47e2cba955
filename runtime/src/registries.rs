//! The registry commands of the CLI: pull, push, login, logout.

use std::io::{IsTerminal, Read};
use std::path::Path;

use anyhow::{Context, Result, bail};
use strata_runtime::image::Reference;
use strata_runtime::registry::{self, Credentials, Options, Platform};

use crate::cli::RegistryArgs;
use crate::images::{human_size, open};

fn options(a: &RegistryArgs) -> Result<Options> {
    let mut insecure = registry::configured_insecure()?;
    if a.insecure {
        insecure.push("*".into());
    }
    Ok(Options {
        insecure,
        auth_file: a
            .auth_file
            .clone()
            .unwrap_or_else(registry::default_auth_file),
        parallel: a.max_concurrent.max(1),
    })
}

fn server(s: Option<String>) -> Result<String> {
    let s = s.unwrap_or_else(|| "docker.io".into());
    let s = s
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    if s.is_empty()
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
    {
        bail!("invalid registry {s:?}: want host[:port]");
    }
    Ok(match s.as_str() {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".into(),
        _ => s,
    })
}

pub fn cmd_pull(
    root: &Path,
    reference: &str,
    platform: Option<&str>,
    quiet: bool,
    a: &RegistryArgs,
) -> Result<()> {
    let r: Reference = reference.parse()?;
    let platform = match platform {
        Some(p) => p.parse()?,
        None => Platform::host(),
    };
    let opts = options(a)?;
    let mut images = open(root)?;
    let show = !quiet && std::io::stderr().is_terminal();
    if !quiet {
        println!(
            "{}: Pulling from {}",
            r.tag.as_deref().or(r.digest.as_deref()).unwrap_or("latest"),
            r.path
        );
    }
    let p = registry::pull(&mut images, &r, &platform, &opts, show)
        .with_context(|| format!("pulling {}", r.familiar()))?;
    if quiet {
        println!("{}", p.digest);
        return Ok(());
    }
    println!("Digest: {}", p.digest);
    if p.downloaded == 0 && p.present > 0 {
        println!("Status: Image is up to date for {}", r.familiar());
    } else {
        println!(
            "Status: Downloaded newer image for {} ({} layers, {} downloaded, {} already here)",
            r.familiar(),
            p.downloaded + p.present,
            human_size(p.bytes),
            p.present
        );
    }
    println!("{r}");
    Ok(())
}

pub fn cmd_push(root: &Path, reference: &str, quiet: bool, a: &RegistryArgs) -> Result<()> {
    let r: Reference = reference.parse()?;
    let opts = options(a)?;
    let images = open(root)?;
    let img = images
        .store
        .resolve(reference)
        .with_context(|| format!("no image {reference} to push: tag one with `strata tag`"))?;
    if !img.tags.contains(&r) {
        bail!(
            "image {} is not tagged {}: `strata tag {} {}` first",
            &img.config.hex()[..12],
            r.familiar(),
            &img.config.hex()[..12],
            r.familiar()
        );
    }
    let show = !quiet && std::io::stderr().is_terminal();
    if !quiet {
        println!("The push refers to repository [{}]", r.repository());
    }
    let p = registry::push(&images, &img, &r, &opts, show)
        .with_context(|| format!("pushing {}", r.familiar()))?;
    let digest = p.digest.expect("a push that succeeded has a digest");
    if quiet {
        println!("{digest}");
        return Ok(());
    }
    println!(
        "{}: digest: {digest} size: {} ({} blobs pushed, {}; {} mounted; {} already there)",
        r.tag.as_deref().unwrap_or("latest"),
        p.size,
        p.uploaded,
        human_size(p.bytes),
        p.mounted,
        p.existed
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn cmd_login(
    server_name: Option<String>,
    username: Option<String>,
    password: Option<String>,
    password_stdin: bool,
    a: &RegistryArgs,
) -> Result<()> {
    let domain = server(server_name)?;
    let opts = options(a)?;
    let user = match username {
        Some(u) => u,
        None => bail!("a user name is required: strata login -u USER [--password-stdin] {domain}"),
    };
    let password = match (password, password_stdin) {
        (Some(_), true) => bail!("--password and --password-stdin are exclusive"),
        (Some(p), false) => {
            eprintln!("WARNING! Using --password via the CLI is insecure. Use --password-stdin.");
            p
        }
        (None, true) => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the password from stdin")?;
            s.trim_end_matches(['\n', '\r']).to_string()
        }
        (None, false) => bail!("a password is required: pipe it to --password-stdin"),
    };
    if password.is_empty() {
        bail!("the password is empty");
    }
    if user.contains(':') {
        bail!("a user name cannot contain ':'");
    }
    registry::login(&domain, &Credentials { user, password }, &opts)
        .with_context(|| format!("logging in to {domain}"))?;
    println!(
        "Login Succeeded (credentials in {})",
        opts.auth_file.display()
    );
    Ok(())
}

pub fn cmd_logout(server_name: Option<String>, a: &RegistryArgs) -> Result<()> {
    let domain = server(server_name)?;
    let opts = options(a)?;
    if registry::logout(&domain, &opts)? {
        println!("Removing login credentials for {domain}");
    } else {
        println!("Not logged in to {domain}");
    }
    Ok(())
}
