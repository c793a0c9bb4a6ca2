//! The flags of the cluster plane: the internal secret, where a worker announces itself, and
//! how to reach etcd.

use super::{DEFAULT_ETCD_TTL_SECS, flag, list, opt};
use clap::Args;
use std::path::PathBuf;

/// How to reach etcd (discovery; needs a build with `--features etcd`).
#[derive(Args, Debug, Clone, PartialEq, Default)]
pub struct EtcdArgs {
    /// etcd endpoints (comma-separated: `http://host:2379`, or `https://…` with --etcd-ca-file).
    #[arg(long, value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// etcd user (etcd's RBAC); its password comes from --etcd-password-file.
    #[arg(long, requires = "etcd_password_file")]
    pub etcd_user: Option<String>,
    /// File whose first line is the etcd user's password (never on the command line).
    #[arg(long, env = protocol::discovery::ETCD_PASSWORD_FILE_ENV, requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed etcd's: TLS to etcd.
    #[arg(long)]
    pub etcd_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's `--client-cert-auth`, with --etcd-key-file.
    #[arg(long, requires_all = ["etcd_key_file", "etcd_ca_file"])]
    pub etcd_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "etcd_cert_file")]
    pub etcd_key_file: Option<PathBuf>,
}

impl EtcdArgs {
    /// The settings, the password read from its file.
    pub fn config(&self) -> anyhow::Result<protocol::discovery::EtcdConfig> {
        let user = match (&self.etcd_user, &self.etcd_password_file) {
            (Some(u), Some(f)) => Some((u.clone(), protocol::discovery::read_password(f)?)),
            _ => None,
        };
        Ok(protocol::discovery::EtcdConfig {
            endpoints: self.etcd.clone(),
            user,
            tls: self
                .etcd_ca_file
                .clone()
                .map(|ca_file| protocol::discovery::EtcdTls {
                    ca_file,
                    cert_file: self.etcd_cert_file.clone(),
                    key_file: self.etcd_key_file.clone(),
                }),
        })
    }

    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        list(&mut a, "etcd", &self.etcd);
        opt(&mut a, "etcd-user", self.etcd_user.as_ref());
        for (name, p) in [
            ("etcd-password-file", &self.etcd_password_file),
            ("etcd-ca-file", &self.etcd_ca_file),
            ("etcd-cert-file", &self.etcd_cert_file),
            ("etcd-key-file", &self.etcd_key_file),
        ] {
            opt(&mut a, name, p.as_ref().map(|p| p.display()));
        }
        a
    }
}

/// Where a worker announces itself.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct DiscoveryArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Seconds the etcd lease lives without a keep-alive: how soon a dead worker leaves the routing table.
    #[arg(long, default_value_t = DEFAULT_ETCD_TTL_SECS)]
    pub etcd_ttl_secs: u64,
    /// Host the scheduler (and prefill workers) reach this worker at (default: the --listen host).
    #[arg(long)]
    pub advertise_host: Option<String>,
}

impl DiscoveryArgs {
    pub fn to_args(&self) -> Vec<String> {
        let mut a = self.etcd.to_args();
        flag(&mut a, "etcd-ttl-secs", self.etcd_ttl_secs);
        opt(&mut a, "advertise-host", self.advertise_host.as_ref());
        a
    }
}

/// The internal plane's secret.
#[derive(Args, Debug, Clone, PartialEq, Default)]
pub struct ClusterArgs {
    /// File holding the cluster secret (at least 16 bytes; `openssl rand -hex 32 > f; chmod 600 f`): every gRPC call and KV data connection between Tandem processes proves it. Required to listen beyond loopback.
    #[arg(long, env = protocol::auth::SECRET_FILE_ENV)]
    pub cluster_secret_file: Option<std::path::PathBuf>,
}

impl ClusterArgs {
    /// The secret, when a file is named.
    pub fn load(&self) -> anyhow::Result<Option<protocol::auth::ClusterSecret>> {
        self.cluster_secret_file
            .as_deref()
            .map(protocol::auth::ClusterSecret::load)
            .transpose()
            .map_err(Into::into)
    }

    /// The flag (a path: the secret itself never travels on a command line, which any local
    /// user can read).
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        opt(
            &mut a,
            "cluster-secret-file",
            self.cluster_secret_file.as_ref().map(|p| p.display()),
        );
        a
    }
}
