//! What each region may do on NATS: the least it needs, written down per role, and rendered as
//! the `authorization` block of a nats-server config (`locus nats-users`).
//!
//! A region plays two roles. As an **origin** it owns one stream (`locus-<deployment>-<region>`,
//! subject `locus.<deployment>.<region>.events`): it creates, updates, inspects and (when it
//! retires) deletes that stream, publishes its events there, and creates the durable consumer of
//! every reader on it, so that interest exists before its first event. As a **reader** it reads
//! every other region's stream only through its own durable consumer `to-<region>`: it may look
//! at any stream's state (for gap checks), create, inspect, pull from, acknowledge through and
//! delete consumers of that one name, and nothing else. Replies (JetStream API answers and pulled
//! events) arrive under the region's own inbox prefix, the one subject tree it may subscribe to.
//!
//! So a region cannot publish into another region's subject, nor pull or acknowledge through
//! another region's consumer, nor subscribe to another region's replies, nor delete or purge
//! another region's stream. Deleting the stream of a region that is gone for good is an operator's
//! act, with an account that may (the `admin` user below).

/// Subjects a NATS user may publish to and subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// The permissions of region `region` of `deployment`.
pub fn for_region(deployment: &str, region: &str) -> Permissions {
    let stream = super::stream_name(deployment, region);
    let consumer = super::consumer_name(region);
    let api = "$JS.API";
    let publish = vec![
        // Origin: its events, its stream, the consumers on its stream.
        super::subject(deployment, region),
        format!("{api}.STREAM.CREATE.{stream}"),
        format!("{api}.STREAM.UPDATE.{stream}"),
        format!("{api}.STREAM.INFO.{stream}"),
        format!("{api}.STREAM.DELETE.{stream}"),
        format!("{api}.CONSUMER.CREATE.{stream}.>"),
        format!("{api}.CONSUMER.DURABLE.CREATE.{stream}.>"),
        format!("{api}.CONSUMER.INFO.{stream}.>"),
        format!("{api}.CONSUMER.DELETE.{stream}.>"),
        // Reader: the account's limits, any stream's state, and its own consumer on each.
        format!("{api}.INFO"),
        format!("{api}.STREAM.INFO.*"),
        format!("{api}.CONSUMER.CREATE.*.{consumer}"),
        format!("{api}.CONSUMER.CREATE.*.{consumer}.>"),
        format!("{api}.CONSUMER.DURABLE.CREATE.*.{consumer}"),
        format!("{api}.CONSUMER.INFO.*.{consumer}"),
        format!("{api}.CONSUMER.DELETE.*.{consumer}"),
        format!("{api}.CONSUMER.MSG.NEXT.*.{consumer}"),
        // Acknowledgements go to the delivery's reply subject: `$JS.ACK.<stream>.<consumer>.…`,
        // or with a domain and account hash before the stream.
        format!("$JS.ACK.*.{consumer}.>"),
        format!("$JS.ACK.*.*.*.{consumer}.>"),
    ];
    Permissions {
        publish,
        subscribe: vec![format!(
            "{}.>",
            super::connection::inbox_prefix(deployment, region)
        )],
    }
}

/// How a password appears in a nats-server config.
pub enum PasswordSource<'a> {
    /// The password itself (quoted into the file): for tests.
    Literal(&'a str),
    /// An environment variable of the nats-server process (`$NAME` in the file).
    Variable(&'a str),
}

impl PasswordSource<'_> {
    fn render(&self) -> String {
        match self {
            PasswordSource::Literal(p) => quoted(p),
            PasswordSource::Variable(name) => format!("${name}"),
        }
    }
}

fn quoted(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

fn list(subjects: &[String]) -> String {
    subjects
        .iter()
        .map(|s| format!("          {}", quoted(s)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `authorization` block of a nats-server config: one user per region (named after it),
/// each with [`for_region`]'s permissions, and, when given, an `admin` user that may do anything
/// (operators: deleting a gone region's stream, inspecting every stream).
pub fn nats_users(
    deployment: &str,
    regions: &[(&str, PasswordSource<'_>)],
    admin: Option<PasswordSource<'_>>,
) -> String {
    let mut out = String::from("authorization {\n  users: [\n");
    for (region, password) in regions {
        let p = for_region(deployment, region);
        out.push_str(&format!(
            "    {{\n      user: {}\n      password: {}\n      permissions: {{\n        publish: {{ allow: [\n{}\n        ] }}\n        subscribe: {{ allow: [\n{}\n        ] }}\n      }}\n    }}\n",
            quoted(region),
            password.render(),
            list(&p.publish),
            list(&p.subscribe),
        ));
    }
    if let Some(password) = admin {
        out.push_str(&format!(
            "    {{ user: \"admin\", password: {} }}\n",
            password.render()
        ));
    }
    out.push_str("  ]\n}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A NATS subject pattern matches a subject: `*` one token, `>` one or more at the end.
    fn matches(pattern: &str, subject: &str) -> bool {
        let p: Vec<&str> = pattern.split('.').collect();
        let s: Vec<&str> = subject.split('.').collect();
        for (i, token) in p.iter().enumerate() {
            match *token {
                ">" => return s.len() > i,
                "*" if i < s.len() => {}
                t if s.get(i) == Some(&t) => {}
                _ => return false,
            }
        }
        p.len() == s.len()
    }

    fn may_publish(region: &str, subject: &str) -> bool {
        for_region("prod", region)
            .publish
            .iter()
            .any(|p| matches(p, subject))
    }

    #[test]
    fn a_region_may_do_its_own_work() {
        for subject in [
            "locus.prod.eu.events",
            "$JS.API.STREAM.CREATE.locus-prod-eu",
            "$JS.API.CONSUMER.CREATE.locus-prod-eu.to-us",
            "$JS.API.CONSUMER.DURABLE.CREATE.locus-prod-eu.to-ap",
            "$JS.API.CONSUMER.CREATE.locus-prod-us.to-eu",
            "$JS.API.CONSUMER.MSG.NEXT.locus-prod-us.to-eu",
            "$JS.API.STREAM.INFO.locus-prod-us",
            "$JS.ACK.locus-prod-us.to-eu.1.2.2.1700000000.0",
            "$JS.ACK.hub.ACCHASH.locus-prod-us.to-eu.1.2.2.1700000000.0.x",
        ] {
            assert!(may_publish("eu", subject), "{subject}");
        }
        assert!(for_region("prod", "eu")
            .subscribe
            .iter()
            .any(|p| matches(p, "_INBOX.prod.eu.abc123")));
    }

    #[test]
    fn a_region_may_not_touch_another_regions_stream_or_deliveries() {
        for subject in [
            "locus.prod.us.events",
            "$JS.API.STREAM.DELETE.locus-prod-us",
            "$JS.API.STREAM.PURGE.locus-prod-us",
            "$JS.API.STREAM.PURGE.locus-prod-eu",
            "$JS.API.CONSUMER.MSG.NEXT.locus-prod-us.to-ap",
            "$JS.API.CONSUMER.MSG.NEXT.locus-prod-eu.to-us",
            "$JS.API.CONSUMER.CREATE.locus-prod-us.spy",
            "$JS.API.CONSUMER.DELETE.locus-prod-us.to-ap",
            "$JS.ACK.locus-prod-us.to-ap.1.2.2.1700000000.0",
        ] {
            assert!(!may_publish("eu", subject), "{subject}");
        }
        assert!(!for_region("prod", "eu")
            .subscribe
            .iter()
            .any(|p| matches(p, "_INBOX.prod.us.abc123") || matches(p, "_INBOX.abc")));
    }

    #[test]
    fn the_compose_users_file_is_what_locus_nats_users_prints() {
        let shipped = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/nats/users.conf"
        ))
        .unwrap();
        let regions = ["eu", "us", "ap", "sa"].map(String::from);
        assert_eq!(
            shipped,
            crate::app::nats_users("compose", &regions, true).unwrap(),
            "regenerate deploy/nats/users.conf with the command on its first line"
        );
    }

    #[test]
    fn the_users_block_names_every_region_and_takes_passwords_from_the_environment() {
        let text = nats_users(
            "prod",
            &[
                ("eu", PasswordSource::Variable("NATS_EU_PASSWORD")),
                ("us", PasswordSource::Literal("p\"w")),
            ],
            None,
        );
        assert!(text.contains("user: \"eu\"\n      password: $NATS_EU_PASSWORD\n"));
        assert!(text.contains("password: \"p\\\"w\""));
        assert!(text.contains("\"_INBOX.prod.us.>\""));
        assert!(!text.contains("admin"));
    }
}
