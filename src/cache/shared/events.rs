//! The shared tier's events channel: fill notices wake this instance's waiters, purge notices
//! go to the memory cache; and the subscription is the tier's health check when no request
//! uses Redis.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc::UnboundedSender;

use super::{SharedTier, TierError, describe, outcome};

impl SharedTier {
    /// Follow the events channel for as long as the tier lives: a fill notice wakes this
    /// instance's waiters, any other notice (a purge) goes to `notices`.
    ///
    /// The subscription is also the tier's health check when no request uses Redis: each
    /// attempt to subscribe, and the subscription's end, is settled through the breaker like a
    /// command (as its probe when it is half-open). So Redis going away is reported (the `up`
    /// gauge, `/readyz`, a warning) within a few seconds, and its return too, traffic or not.
    pub(super) fn listen(&self, client: redis::Client, notices: UnboundedSender<String>) {
        let weak = Arc::downgrade(&self.inner);
        let channel = self.channel();
        tokio::spawn(async move {
            let (mut followed, mut refused) = (false, false);
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let tier = SharedTier { inner };
                let subscribed = tier.subscribe(&client, &channel).await;
                if let (Err(TierError::Refused(reason)), false) = (&subscribed, refused) {
                    // Commands work, so the tier stays in use; what does not reach this
                    // instance is said once.
                    tracing::warn!(
                        error = %reason,
                        "shared tier: Redis refuses the subscription to {channel}: purges and fills on other instances do not reach this one until the Redis user may use the channel (ACL &{channel}); trying again every second"
                    );
                    refused = true;
                }
                // Only the weak reference is held while following: the tier may go away.
                drop(tier);
                if let Ok(pubsub) = subscribed {
                    if followed || refused {
                        tracing::info!("shared tier: following fill and purge notices again");
                    }
                    (followed, refused) = (true, false);
                    let mut stream = pubsub.into_on_message();
                    while let Some(message) = stream.next().await {
                        let Some(inner) = weak.upgrade() else { return };
                        let text = String::from_utf8_lossy(message.get_payload_bytes());
                        if text.starts_with("filled ") {
                            inner.filled.notify_waiters();
                            continue;
                        }
                        let (notice, origin) = text.rsplit_once(' ').unwrap_or((&text, ""));
                        if origin != inner.origin && notices.send(notice.to_owned()).is_err() {
                            return;
                        }
                    }
                    // Redis closed the connection (a restart, a shutdown, the network).
                    let Some(inner) = weak.upgrade() else { return };
                    let lost: Result<(), TierError> = Err(TierError::Redis(
                        "the connection for fill and purge notices closed".to_owned(),
                    ));
                    SharedTier { inner }
                        .admitted("subscribe", async { lost })
                        .await
                        .ok();
                }
                // Subscribe again in a second (once per process, never per request).
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    /// Subscribe to the events channel, through the breaker like a command; a refusal
    /// (NOPERM: the Redis user may not use the channel) is Redis answering.
    async fn subscribe(
        &self,
        client: &redis::Client,
        channel: &str,
    ) -> Result<redis::aio::PubSub, TierError> {
        let timeout = self.inner.timeout.max(Duration::from_secs(1));
        self.admitted("subscribe", async {
            let bounded = tokio::time::timeout(timeout, async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(channel).await?;
                redis::RedisResult::Ok(pubsub)
            })
            .await;
            match bounded {
                Ok(Err(error)) if error.code() == Some("NOPERM") => {
                    Err(TierError::Refused(describe(&error)))
                }
                bounded => outcome(bounded, timeout),
            }
        })
        .await
    }
}
