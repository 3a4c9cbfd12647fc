"""mailer: an asyncio e-mail service (MongoDB first, beanstalkd queue, vendor failover)."""
