"""Turns a task description into the classifier's input vector.

Shared by training (``novacron.models.train``) and serving
(``novacron.coordinator.classifier``), so both see exactly the same numbers.
Pure Python + numpy: scikit-learn is never needed to compute features.

The vector has three blocks:

* **word TF-IDF** over lightly stemmed word 1- and 2-grams (vocabulary and IDF
  learned at training time, stored in the metadata JSON);
* **character TF-IDF** over 3- to 5-character pieces of each word padded with
  spaces (" repo", "repos", "itor"...): it carries meaning to word forms,
  misspellings and compounds the word block never saw ("repos" and
  "repositories", "migraiton", "ourself");
* **scope features**: hand-made measures of how much work a description
  implies (how many components it touches, external systems, distributed or
  multi-region cues, small-edit cues such as a typo or a config value, scale
  numbers...). Each has a readable name and a phrase used in the reasons.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

# ---------------------------------------------------------------- tokenising

_TOKEN = re.compile(r"\d+(?:[.,:]\d+)*[a-z%]*|[a-z][a-z0-9+#]*(?:[-'][a-z0-9]+)*")
# Suffixes stripped so that "replicate", "replicated", "replication" meet.
_SUFFIXES = ("ations", "ation", "ings", "ing", "ments", "ment", "ers", "er", "ed", "es", "s")


def _token_class(tok: str) -> str:
    """Numbers become shape classes: their size says more than their digits."""
    if not tok[0].isdigit():
        return tok
    if tok.count(".") >= 2:
        return "#ver"
    digits = re.match(r"[\d,.]+", tok)
    value = 0.0
    if digits:
        try:
            value = float(digits.group(0).replace(",", ""))
        except ValueError:
            value = 0.0
    unit = tok[digits.end():] if digits else ""
    if unit in ("k", "m", "tb", "pb", "tbps", "gbps"):
        return "#bignum"
    if value >= 1000:
        return "#bignum"
    return "#num"


def stem(word: str) -> str:
    if word.startswith("#") or len(word) <= 4:
        return word
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            return word[: -len(suffix)]
    return word


def normalise(text: str) -> str:
    return " ".join(text.lower().replace("\u2019", "'").split())


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(normalise(text))


_WORD = re.compile(r"[a-z0-9]+")
CHAR_NGRAM_RANGE = (3, 5)


def char_ngrams(text: str) -> list[tuple[str, str]]:
    """(character n-gram, the word it came from) over each word padded with spaces."""
    lo, hi = CHAR_NGRAM_RANGE
    out: list[tuple[str, str]] = []
    for word in _WORD.findall(normalise(text)):
        padded = f" {word} "
        for n in range(lo, hi + 1):
            for i in range(len(padded) - n + 1):
                out.append((padded[i:i + n], word))
    return out


def ngrams(text: str) -> list[tuple[str, str]]:
    """(stemmed n-gram, surface form) for word 1- and 2-grams."""
    surface = tokens(text)
    stems = [stem(_token_class(t)) for t in surface]
    out = [(s, w) for s, w in zip(stems, surface, strict=True)]
    for i in range(len(stems) - 1):
        out.append((f"{stems[i]} {stems[i + 1]}", f"{surface[i]} {surface[i + 1]}"))
    return out


# ---------------------------------------------------------------- lexicons
# Each lexicon is a list of regex fragments matched on whole words of the
# lower-cased text. Fragments may carry \w* to cover word forms.

def _lexicon(*fragments: str) -> re.Pattern[str]:
    # Not inside a hyphenated word on the left ("region" in "multi-region"), but
    # may start one ("raft" in "raft-based").
    return re.compile(r"(?<![\w-])(?:" + "|".join(fragments) + r")(?!\w)")


# Component kinds: distinct kinds touched is the main "scope" signal.
COMPONENT_KINDS: dict[str, re.Pattern[str]] = {
    "API": _lexicon(r"apis?", r"endpoints?", r"rest", r"graphql", r"grpc", r"routes?", r"/api\S*"),
    "database": _lexicon(r"databases?", r"db", r"postgres\w*", r"mysql", r"tables?", r"schemas?",
                         r"columns?", r"cassandra", r"snowflake", r"redshift", r"sql", r"rows?"),
    "queue": _lexicon(r"queues?", r"kafka", r"rabbitmq", r"brokers?", r"topics?", r"event bus",
                      r"streams?", r"streaming", r"outbox"),
    "cache": _lexicon(r"cache", r"caches", r"caching", r"redis", r"memcached", r"cdn"),
    "web UI": _lexicon(r"ui", r"frontend", r"web app", r"pages?", r"dashboards?", r"admin \w+",
                       r"forms?", r"website", r"site", r"storefront", r"portal", r"console"),
    "mobile app": _lexicon(r"mobile", r"ios", r"android", r"mobile apps?", r"devices?",
                           r"smartwatch"),
    "backend service": _lexicon(r"backend", r"services?", r"microservices?", r"servers?"),
    "worker": _lexicon(r"workers?", r"background jobs?", r"jobs?", r"cron\w*", r"scheduler"),
    "storage": _lexicon(r"storage", r"buckets?", r"s3", r"object storage", r"disks?",
                        r"volumes?", r"block store"),
    "search": _lexicon(r"search", r"elasticsearch", r"index\w*", r"vector database"),
    "auth": _lexicon(r"auth\w*", r"login", r"sign-?in", r"sso", r"identity", r"permissions?",
                     r"roles?", r"accounts?"),
    "billing": _lexicon(r"billing", r"payments?", r"invoic\w*", r"checkout", r"subscriptions?"),
    "notifications": _lexicon(r"emails?", r"sms", r"push", r"notifications?", r"reminders?"),
    "monitoring": _lexicon(r"monitoring", r"metrics?", r"alerts?", r"alerting", r"grafana",
                           r"prometheus", r"tracing", r"logs"),
    "network": _lexicon(r"network\w*", r"dns", r"proxy", r"load balancers?", r"gateway",
                        r"vpn", r"firewall", r"mesh"),
    "CI/CD": _lexicon(r"ci", r"pipelines?", r"deploy\w*", r"builds?", r"releases?"),
    "CLI": _lexicon(r"cli", r"command-line"),
    "hypervisor": _lexicon(r"vms?", r"qemu", r"hypervisors?", r"agents?", r"hosts?", r"guests?"),
    "ML model": _lexicon(r"models?", r"training", r"inference"),
    "warehouse": _lexicon(r"warehouse", r"lake\w*", r"dbt", r"etl", r"crm"),
}

EXTERNAL_SYSTEMS = _lexicon(
    r"stripe", r"paypal", r"salesforce", r"okta", r"auth0", r"twilio", r"zendesk", r"hubspot",
    r"intercom", r"shopify", r"xero", r"avalara", r"docusign", r"contentful", r"amplitude",
    r"firebase", r"fcm", r"apns", r"google", r"google \w+", r"github", r"microsoft", r"azure ad",
    r"outlook", r"apple", r"facebook", r"slack api", r"aws \w+",
    r"third-party", r"providers?", r"provider's", r"vendors?", r"vendor's", r"partners?",
    r"partner's", r"external", r"saas", r"sdks?", r"carrier's", r"bank's", r"open-banking",
    r"apple pay", r"google pay", r"pagerduty", r"webrtc", r"llm", r"hosted",
)
INTEGRATION = _lexicon(
    r"integrat\w*", r"sync\w*", r"connect", r"connects", r"hook up", r"webhooks?", r"callbacks?",
    r"oauth\d?", r"sso", r"saml", r"openid", r"oidc", r"scim", r"federat\w*", r"two-way",
    r"both ways", r"import\w*", r"provisioning",
)
SMALL_EDIT = _lexicon(
    r"typos?", r"spell\w*", r"misspel\w*", r"grammar", r"capitaliz\w*", r"renam\w*", r"bump\w*",
    r"pin", r"tweak", r"wording", r"comma", r"semicolon", r"newline", r"indentation",
    r"whitespace", r"colou?r", r"font", r"icon", r"favicon", r"placeholder", r"tooltip", r"label",
    r"copy", r"text", r"title", r"heading", r"screenshot", r"alt text", r"footer", r"backticks",
    r"docstring", r"comment", r"message",
)
CONFIG_VALUE = _lexicon(
    r"config\w*", r"settings?", r"constant", r"flag", r"timeout", r"limit", r"variable",
    r"default", r"threshold", r"interval", r"retention", r"ttl", r"mtu", r"max-age", r"size",
    r"count", r"port", r"schedule", r"version", r"tag", r"\S+\.(?:ya?ml|toml|json|env|conf|cfg|txt|"
    r"gradle|md|py|js)", r"dockerfile", r"podfile", r"makefile", r"\.nvmrc", r"sysctl",
    r"environment variable",
)
FROM_TO = re.compile(r"\bfrom\s+\S+(?:\s+\S+)?\s+to\s+\S+|->|\binstead of\b|"
                     r"\b(?:should|must) (?:say|read)\b|\bto (?:say|read) [\"'“]|"
                     r"\b(?:says|reads|shows) [\"'“]")
LOG_LINE = _lexicon(r"log line", r"log message", r"log level", r"print\w*", r"console\.log",
                    r"debug", r"log the", r"add a log", r"debug log", r"log statement",
                    r"log entry", r"logs? when", r"log a")
LOCAL_SCOPE = _lexicon(r"one line", r"one file", r"a single", r"one place", r"in one", r"one",
                       r"small", r"quick", r"minor", r"trivial", r"just", r"only", r"leftover",
                       r"stray", r"unused", r"missing", r"obsolete", r"duplicate")
FEATURE_VERBS = _lexicon(r"add\w*", r"implement\w*", r"write", r"writes", r"create\w*",
                         r"support\w*", r"allow\w*", r"let")
BUILD_VERBS = _lexicon(r"build\w*", r"design\w*", r"introduc\w*", r"set up", r"develop\w*",
                       r"create")
NEW_SERVICE = _lexicon(r"new service", r"its own (?:database|storage|tables?|db)",
                       r"own database", r"service with", r"microservices?", r"a service that",
                       r"new \w+ service", r"small service", r"a new")
ARCHITECTURE = _lexicon(r"design\w*", r"architect\w*", r"re-architect\w*", r"redesign\w*",
                        r"rebuild\w*", r"rewrit\w*", r"re-platform\w*", r"replac\w*",
                        r"overhaul\w*", r"platform", r"framework", r"re-engineer\w*",
                        r"specification", r"protocol")
DISTRIBUTED = _lexicon(
    r"consensus", r"raft", r"paxos", r"replicat\w*", r"replicas?", r"shard\w*", r"reshard\w*",
    r"partition\w*", r"leader election", r"leader-elected", r"quorum", r"crdt\w*",
    r"conflict-free", r"exactly-once", r"distributed", r"linearizab\w*", r"fenc\w*",
    r"split-brain", r"consistent hashing", r"failover", r"fail over", r"high availability",
    r"highly available", r"active-active", r"consisten\w*", r"ordering guarantees",
    r"state machines?",
)
MULTI_REGION = _lexicon(
    r"multi-region", r"cross-region", r"regions", r"regional", r"region", r"active-active",
    r"global\w*", r"worldwide", r"data cent(?:er|re)s?", r"availability zones", r"zones?",
    r"continents", r"multi-cloud", r"clouds", r"geo-\w+", r"edge", r"wan", r"residency",
)
SCALE_NUMBER = re.compile(
    r"\b\d+(?:[.,]\d+)*\s*(?:k|m|million|billion|thousand|tb|pb|tbps|gbps)\b|\b\d{1,3}(?:,\d{3})+\b"
    r"|\b(?:millions|billions|thousands|hundreds)\b|\bper second\b|\b\d+x\b"
)
BIG_COUNT = re.compile(
    r"\b(?:\d{2,}|\d+,\d{3}|\d+k)\s+(?:\w+\s)?(?:services|hosts|servers|teams|repositories|clusters|"
    r"vms|nodes|sites|regions|locations|data centers|databases|jobs|screens|products|apps|"
    r"engineers|runners|workloads|racks|gpus|models|users|documents|customers)\b"
)
SCALE_WORDS = _lexicon(
    r"at scale", r"fleet\w*", r"entire", r"whole", r"company-wide", r"company", r"organi[sz]ation",
    r"all (?:our |the |of the )?(?:services|teams|systems|repositories|products|databases|clusters|"
    r"hosts|regions|workloads|vms|apps|customers|models|pipelines)",
    r"every \w+", r"across all", r"across every", r"everything",
)
MIGRATION = _lexicon(r"migrat\w*", r"move", r"moves", r"moving", r"transition\w*",
                     r"re-platform\w*", r"consolidat\w*", r"convert\w*", r"upgrade")
ZERO_DOWNTIME = re.compile(
    r"zero[- ]downtime|no downtime|without downtime|minimal downtime|no customer-visible|"
    r"\bonline\b|\blive\b|while (?:the |it |they )?\w* ?(?:running|serving|online|shipping)|"
    r"without (?:losing|interrupting|disturbing|breaking|noticing|forcing)|no data loss|"
    r"in parallel|dual writes|keep(?:s|ing)? (?:running|working)"
)
SECURITY_CRITICAL = _lexicon(
    r"end-to-end encrypt\w*", r"end-to-end encrypted", r"key management", r"kms", r"hsm\S*",
    r"zero-trust", r"pci", r"pci dss", r"fedramp", r"soc 2", r"iso 27001", r"attestation",
    r"cryptograph\w*", r"secure boot", r"confidential computing", r"tamper\S*", r"breach",
    r"compliance", r"tenant isolation", r"differential privacy", r"secure aggregation",
    r"multi-party", r"certificate authority", r"key transparency", r"key exchange",
    r"customer-managed", r"intrusion detection", r"supply chain",
)
SECURITY = _lexicon(r"secur\w*", r"encrypt\w*", r"tokens?", r"passwords?", r"xss", r"csrf",
                    r"injection", r"vulnerab\w*", r"cve", r"mfa", r"2fa", r"tls", r"mtls",
                    r"certificates?", r"secrets?", r"keys?", r"audit\w*")
PERFORMANCE = _lexicon(
    r"latency", r"p9\d", r"throughput", r"requests per second", r"performance", r"bottleneck\w*",
    r"profil\w*", r"\d+\s*ms", r"capacity", r"load test\w*", r"slow", r"faster", r"speed",
)
LIVE_MIGRATION = re.compile(
    r"live[- ]migrat\w*|pre-copy|post-copy|dirty (?:page|rate)\w*|userfaultfd|auto-converge|"
    r"stop-and-copy|live-migrat\w*"
)
ENDPOINT = _lexicon(r"endpoints?", r"routes?", r"get /\S*", r"post /\S*", r"/api\S*",
                    r"requests?", r"responses?", r"status code", r"4\d\d", r"5\d\d")
UI_ELEMENT = _lexicon(r"buttons?", r"forms?", r"pages?", r"screens?", r"modal", r"dialog",
                      r"tabs?", r"components?", r"dropdown", r"toggle", r"banner", r"views?",
                      r"sidebar", r"header", r"menu", r"wizard")
QUERY = _lexicon(r"query", r"queries", r"sql", r"index", r"views?", r"joins?", r"columns?",
                 r"select", r"rows?")
AUTOMATION = _lexicon(r"scripts?", r"cron", r"jobs?", r"timer", r"workflows?", r"hooks?",
                      r"playbooks?", r"role", r"module", r"targets?", r"dags?", r"steps?",
                      r"command")
BUGFIX = _lexicon(r"fix\w*", r"bugs?", r"crash\w*", r"race", r"leak", r"broken", r"breaks",
                  r"fails?", r"wrong", r"errors?", r"regression", r"flaky", r"incorrect")
VALIDATION = _lexicon(r"validat\w*", r"reject\w*", r"sanitiz\w*", r"check\w*", r"verif\w*")
TESTING = _lexicon(r"tests?", r"testing", r"fixtures?", r"assert\w*", r"coverage", r"e2e")
EXISTING = _lexicon(r"existing", r"current", r"currently", r"already")
QUANTIFIER_ALL = _lexicon(r"all", r"every", r"each", r"whole", r"entire", r"any")
SPAN_WORDS = _lexicon(r"across", r"between", r"both", r"throughout", r"end to end",
                      r"end-to-end", r"together")
PLURAL_SYSTEMS = _lexicon(r"services", r"systems", r"teams", r"repositories", r"clusters",
                          r"regions", r"products", r"apps", r"hosts", r"servers", r"nodes",
                          r"databases", r"tenants")
WITH_CLAUSE = _lexicon(r"with", r"including", r"plus", r"along with")
NEW_WORD = _lexicon(r"new")
DOCS = _lexicon(r"readme\S*", r"docs?", r"documentation", r"documented", r"guide", r"changelog",
                r"faq", r"manual", r"tutorial", r"runbook", r"handbook", r"contributing\S*")
WEEKS_WORDS = _lexicon(r"months?", r"quarter", r"weeks?", r"waves?", r"game days")
RELIABILITY = _lexicon(r"surviv\w*", r"fault[- ]toleran\w*", r"rollback", r"roll back",
                       r"disaster recovery", r"rpo", r"rto", r"redundan\w*", r"resilien\w*",
                       r"recover\w*", r"retries", r"retry")
SMALL_VERB_START = re.compile(
    r"^(?:please |quick fix: |small one: |typo\W+)?(?:fix the typo|fix typo|typo|bump|pin|rename|"
    r"change|set|update|increase|raise|lower|reduce|remove|delete|swap|turn (?:on|off)|make the|"
    r"correct|capitalize|replace the|add a missing|add alt|add a log|add a one-line|add a tag|"
    r"log|mention|hide|drop the|open port|return the)\b"
)
BIG_VERB_START = re.compile(
    r"^(?:we need to |we want |we must )?(?:build|design|implement|introduce|set up|migrate|"
    r"move|re-architect|rebuild|rewrite|replace|redesign|scale|shard|make the|make every|"
    r"make all|create the|consolidate|re-engineer|re-platform|unify|achieve|run|launch|"
    r"integrate|connect|add (?:multi|sso|oauth|subscription|single sign-on|internationali)|"
    r"adopt|harden|respond|reduce the|cut)\b"
)


# Said outright that the change is small and stops there.
NOTHING_ELSE = re.compile(
    r"\b(?:nothing else|that's it|that is it|no other change\w*|no behaviou?r change|"
    r"(?:docs?|copy|config|display|label) only|only (?:this|that|the|one)\b|"
    r"one (?:value|line|number|string|constant|setting|flag|word|key|config key|place)\b|"
    r"single (?:string|value|line|constant|setting)|just (?:a|the|one|bump|change|rename|fix)\b)"
)
# Many things of one kind: "hundreds of repositories", "all 300 repos", "every clinic".
MANY_THINGS = re.compile(
    r"\b(?:hundreds|thousands|dozens|millions|billions|tens) of\b|"
    r"\b(?:all|every|each)(?: (?:of )?(?:our|the|its|their))? (?:\d[\d,.]*\+? )?"
    r"(?:repos|repositories|services|microservices|teams|products|apps|games|pipelines|jobs|"
    r"clusters|hosts|servers|vms|devices|regions|sites|offices|stores|clinics|hospitals|"
    r"countries|systems|databases|tables|dashboards|reports|models|customers|tenants|users|"
    r"pages|screens|data ?cent(?:er|re)s|workloads|accounts|platforms|markets)\b|"
    r"\b\d[\d,.]*\+?\s*k?\s+(?:\w+\s)?(?:repos|repositories|microservices|pipelines|"
    r"stores|clinics|hospitals|offices|countries|cities|devices|tables|dashboards|reports|"
    r"pages|screens|apps|games|languages|products|sites|data ?cent(?:er|re)s|tenants|"
    r"accounts|gpus)\b"
)
# The object of the work is a whole system, not a part of one.
SYSTEM_OBJECT = _lexicon(
    r"platform", r"monolith\w*", r"(?:whole|entire|full) (?:\w+ )?(?:stack|product|system|"
    r"platform|backend|frontend|company|org|infrastructure|fleet)", r"everything",
    r"infrastructure", r"architecture", r"data cent(?:er|re)s?", r"colo", r"company-wide",
    r"org-wide", r"engineering org\w*", r"installed base", r"core \w+", r"control plane",
    r"the fleet", r"our (?:stack|platform|infrastructure|backend|network)",
)
# Turning one kind of system into another ("batch into streaming", "get off X").
TRANSFORMATION = re.compile(
    r"\b(?:turn|convert|transform|change|move|switch|migrate)\w* (?:\w+ ){0,5}(?:into|over to|"
    r"onto)\b|\bget(?:ting)? off\b|\bexit the\b|\bfrom (?:\w+ ){1,3}to (?:a |an )?(?:\w+ )?"
    r"(?:streaming|real-time|event-driven|microservices|cloud|kubernetes|serverless|"
    r"multi-region|active-active)\b|\b(?:rewrite|rebuild|replatform|re-platform|replace|"
    r"redesign|re-architect)\w* (?:the |our |all |every |both )?(?:whole |entire )?"
    r"(?:\w+ )?(?:stack|platform|system|engine|ledger|network|backend|frontend|netcode|apps?|"
    r"infrastructure|architecture)\b"
)
CREATE_VERBS = _lexicon(r"build\w*", r"create\w*", r"implement\w*", r"introduc\w*",
                        r"design\w*", r"develop\w*", r"set up", r"stand up", r"launch\w*",
                        r"integrat\w*", r"add support", r"support")
EDIT_VERBS = _lexicon(r"change\w*", r"renam\w*", r"bump\w*", r"set", r"update\w*",
                      r"correct\w*", r"swap\w*", r"lower\w*", r"raise\w*", r"increase\w*",
                      r"reduce\w*", r"remove\w*", r"delete\w*", r"hide", r"tweak\w*",
                      r"adjust\w*", r"shorten\w*", r"round", r"drop", r"pin", r"turn (?:on|off)",
                      r"make it", r"fix")
BULLET = re.compile(r"(?m)^\s*(?:[-*\u2022]|\d+[.)])\s+")


# ---------------------------------------------------------------- scope features

@dataclass(frozen=True)
class Doc:
    text: str          # lower-cased, whitespace-normalised
    words: list[str]   # surface tokens
    bullets: int = 0   # list items on their own lines ("- a", "* b", "1. c")
    # Matches per pattern, shared by the features that look at the same lexicon.
    memo: dict[object, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class ScopeFeature:
    name: str
    # How the feature reads in a reason; "{terms}" is replaced by what matched.
    reason: str
    compute: Callable[[Doc], tuple[float, tuple[str, ...]]]


def _hits(pattern: re.Pattern[str], doc: Doc) -> tuple[str, ...]:
    found = doc.memo.get(pattern)
    if found is None:
        found = tuple(dict.fromkeys(pattern.findall(doc.text)))
        doc.memo[pattern] = found
    return found


def _count(pattern: re.Pattern[str]) -> Callable[[Doc], tuple[float, tuple[str, ...]]]:
    def compute(doc: Doc) -> tuple[float, tuple[str, ...]]:
        hits = _hits(pattern, doc)
        return float(len(hits)), hits

    return compute


def _present(pattern: re.Pattern[str]) -> Callable[[Doc], tuple[float, tuple[str, ...]]]:
    def compute(doc: Doc) -> tuple[float, tuple[str, ...]]:
        hits = _hits(pattern, doc)
        return (1.0 if hits else 0.0), hits

    return compute


def _component_kinds(doc: Doc) -> tuple[str, ...]:
    kinds = doc.memo.get("kinds")
    if kinds is None:
        kinds = tuple(kind for kind, pat in COMPONENT_KINDS.items() if _hits(pat, doc))
        doc.memo["kinds"] = kinds
    return kinds


def _component_kind_count(doc: Doc) -> tuple[float, tuple[str, ...]]:
    kinds = _component_kinds(doc)
    return float(len(kinds)), kinds


def _several_components(doc: Doc) -> tuple[float, tuple[str, ...]]:
    kinds = _component_kinds(doc)
    return (1.0 if len(kinds) >= 3 else 0.0), kinds


def _single_component(doc: Doc) -> tuple[float, tuple[str, ...]]:
    kinds = _component_kinds(doc)
    return (1.0 if len(kinds) <= 1 else 0.0), kinds


def _component_mentions(doc: Doc) -> tuple[float, tuple[str, ...]]:
    hits: list[str] = []
    for pat in COMPONENT_KINDS.values():
        hits.extend(_hits(pat, doc))
    return math.log1p(len(hits)), tuple(dict.fromkeys(hits))


def _log_words(doc: Doc) -> tuple[float, tuple[str, ...]]:
    return math.log1p(len(doc.words)), (f"{len(doc.words)} words",)


def _short(doc: Doc) -> tuple[float, tuple[str, ...]]:
    return (1.0 if len(doc.words) <= 12 else 0.0), (f"{len(doc.words)} words",)


def _long(doc: Doc) -> tuple[float, tuple[str, ...]]:
    return (1.0 if len(doc.words) >= 28 else 0.0), (f"{len(doc.words)} words",)


def _char_count(char: str) -> Callable[[Doc], tuple[float, tuple[str, ...]]]:
    def compute(doc: Doc) -> tuple[float, tuple[str, ...]]:
        n = doc.text.count(char)
        return float(min(n, 8)), (f"{n} x '{char}'",)

    return compute


def _and_count(doc: Doc) -> tuple[float, tuple[str, ...]]:
    n = sum(1 for w in doc.words if w == "and")
    return float(min(n, 6)), (f"{n} x 'and'",)


def _list_items(doc: Doc) -> tuple[float, tuple[str, ...]]:
    """Items in enumerations ("a, b and c"): long lists mean many parts of work."""
    n = doc.text.count(",") + sum(1 for w in doc.words if w in ("and", "plus")) + doc.bullets
    return math.log1p(n), (f"{n} listed parts",)


def _bullets(doc: Doc) -> tuple[float, tuple[str, ...]]:
    return float(min(doc.bullets, 8)), (f"{doc.bullets} list items",)


def _create_minus_edit(doc: Doc) -> tuple[float, tuple[str, ...]]:
    """More verbs of making than of changing: new work rather than an edit."""
    create, edit = _hits(CREATE_VERBS, doc), _hits(EDIT_VERBS, doc)
    return float(len(create) - len(edit)), create + edit


def _sentences(doc: Doc) -> tuple[float, tuple[str, ...]]:
    n = len([s for s in re.split(r"[.;:!?]\s", doc.text) if s.strip()])
    return float(min(n, 5)), (f"{n} sentences",)


def _numbers(doc: Doc) -> tuple[float, tuple[str, ...]]:
    nums = [w for w in doc.words if w[0].isdigit()]
    return float(min(len(nums), 6)), tuple(nums)


def _version(doc: Doc) -> tuple[float, tuple[str, ...]]:
    found = tuple(w for w in doc.words if w[0].isdigit() and w.count(".") >= 1)
    return (1.0 if found else 0.0), found


def _quoted(doc: Doc) -> tuple[float, tuple[str, ...]]:
    found = tuple(re.findall(r"[\"“”]([^\"“”]{1,40})[\"“”]", doc.text)) + tuple(
        re.findall(r"(?:^|\s)['‘]([^'’\n]{1,40})['’](?=[\s.,;:!?)]|$)", doc.text))
    return (1.0 if found else 0.0), found


def _from_to(doc: Doc) -> tuple[float, tuple[str, ...]]:
    found = tuple(m.group(0) for m in FROM_TO.finditer(doc.text))
    return (1.0 if found else 0.0), found


def _regex_start(pattern: re.Pattern[str]) -> Callable[[Doc], tuple[float, tuple[str, ...]]]:
    def compute(doc: Doc) -> tuple[float, tuple[str, ...]]:
        m = pattern.search(doc.text)
        return (1.0 if m else 0.0), ((m.group(0),) if m else ())

    return compute


def _both(a: Callable[[Doc], tuple[float, tuple[str, ...]]],
          b: Callable[[Doc], tuple[float, tuple[str, ...]]]
          ) -> Callable[[Doc], tuple[float, tuple[str, ...]]]:
    def compute(doc: Doc) -> tuple[float, tuple[str, ...]]:
        va, ta = a(doc)
        vb, tb = b(doc)
        return (1.0 if va > 0 and vb > 0 else 0.0), ta + tb

    return compute


def _small_edit_narrow(doc: Doc) -> tuple[float, tuple[str, ...]]:
    """A cosmetic/config edit in at most two kinds of component: a one-place change."""
    hits = _hits(SMALL_EDIT, doc) + _hits(CONFIG_VALUE, doc)
    return (1.0 if hits and len(_component_kinds(doc)) <= 2 else 0.0), hits


def _migration_at_scale(doc: Doc) -> tuple[float, tuple[str, ...]]:
    mig = _hits(MIGRATION, doc)
    scale = _hits(SCALE_WORDS, doc) + _hits(SCALE_NUMBER, doc) + _hits(BIG_COUNT, doc)
    return (1.0 if mig and scale else 0.0), mig + scale


def _distributed_not_small(doc: Doc) -> tuple[float, tuple[str, ...]]:
    dist = _hits(DISTRIBUTED, doc) + _hits(MULTI_REGION, doc)
    small = _hits(SMALL_EDIT, doc)
    return (1.0 if dist and not small else 0.0), dist


def _integration_external(doc: Doc) -> tuple[float, tuple[str, ...]]:
    ext = _hits(EXTERNAL_SYSTEMS, doc)
    integ = _hits(INTEGRATION, doc)
    return (1.0 if ext and integ else 0.0), ext + integ


def _feature_in_existing(doc: Doc) -> tuple[float, tuple[str, ...]]:
    verbs = _hits(FEATURE_VERBS, doc)
    return (1.0 if verbs and len(_component_kinds(doc)) <= 2 else 0.0), verbs


SCOPE_FEATURES: tuple[ScopeFeature, ...] = (
    ScopeFeature("component_kinds", "touches {value:.0f} kinds of component ({terms})",
                 _component_kind_count),
    ScopeFeature("several_components", "spans several components ({terms})", _several_components),
    ScopeFeature("single_component", "stays within one kind of component ({terms})",
                 _single_component),
    ScopeFeature("component_mentions", "mentions components often ({terms})", _component_mentions),
    ScopeFeature("external_systems", "names an external system or provider ({terms})",
                 _count(EXTERNAL_SYSTEMS)),
    ScopeFeature("integration_cues", "asks for an integration ({terms})", _count(INTEGRATION)),
    ScopeFeature("integrates_external", "integrates with an outside system ({terms})",
                 _integration_external),
    ScopeFeature("small_edit_cues", "describes a small, local edit ({terms})", _count(SMALL_EDIT)),
    ScopeFeature("config_value_cues", "changes a setting or value ({terms})", _count(CONFIG_VALUE)),
    ScopeFeature("small_edit_in_one_place", "is a cosmetic or config edit in one place ({terms})",
                 _small_edit_narrow),
    ScopeFeature("from_to_value", "changes a value from one thing to another ({terms})", _from_to),
    ScopeFeature("log_line", "is about a log line or debug output ({terms})", _present(LOG_LINE)),
    ScopeFeature("local_scope_words", "signals a narrow scope ({terms})", _count(LOCAL_SCOPE)),
    ScopeFeature("starts_with_small_verb", "opens with a small-change verb ({terms})",
                 _regex_start(SMALL_VERB_START)),
    ScopeFeature("starts_with_build_verb", "opens with a build/design verb ({terms})",
                 _regex_start(BIG_VERB_START)),
    ScopeFeature("feature_verbs", "asks for a new capability ({terms})", _count(FEATURE_VERBS)),
    ScopeFeature("feature_in_one_component", "adds a feature within one or two components "
                 "({terms})", _feature_in_existing),
    ScopeFeature("build_verbs", "asks to build or design something ({terms})", _count(BUILD_VERBS)),
    ScopeFeature("new_service", "introduces a new service or its own storage ({terms})",
                 _count(NEW_SERVICE)),
    ScopeFeature("architecture_cues", "calls for design or re-architecture ({terms})",
                 _count(ARCHITECTURE)),
    ScopeFeature("distributed_systems", "involves distributed-systems concerns ({terms})",
                 _count(DISTRIBUTED)),
    ScopeFeature("multi_region", "is multi-region, global or cross-site ({terms})",
                 _count(MULTI_REGION)),
    ScopeFeature("distributed_not_cosmetic", "is distributed or multi-region work, not a "
                 "cosmetic edit ({terms})", _distributed_not_small),
    ScopeFeature("scale_numbers", "quotes large-scale numbers ({terms})", _count(SCALE_NUMBER)),
    ScopeFeature("big_counts", "counts many systems, hosts or teams ({terms})", _count(BIG_COUNT)),
    ScopeFeature("scale_words", "covers a whole fleet or organisation ({terms})",
                 _count(SCALE_WORDS)),
    ScopeFeature("migration_cues", "involves a migration or move ({terms})", _count(MIGRATION)),
    ScopeFeature("migration_at_scale", "migrates at scale ({terms})", _migration_at_scale),
    ScopeFeature("zero_downtime", "must happen live, without downtime or data loss ({terms})",
                 _count(ZERO_DOWNTIME)),
    ScopeFeature("security_critical", "is security-critical ({terms})", _count(SECURITY_CRITICAL)),
    ScopeFeature("security_cues", "touches security ({terms})", _count(SECURITY)),
    ScopeFeature("performance_cues", "is about performance or capacity ({terms})",
                 _count(PERFORMANCE)),
    ScopeFeature("live_migration", "involves live migration internals ({terms})",
                 _count(LIVE_MIGRATION)),
    ScopeFeature("reliability_cues", "asks for fault tolerance or recovery ({terms})",
                 _count(RELIABILITY)),
    ScopeFeature("long_timeline_words", "mentions a long timeline ({terms})", _count(WEEKS_WORDS)),
    ScopeFeature("endpoint_cues", "is about an endpoint or request ({terms})", _count(ENDPOINT)),
    ScopeFeature("ui_element_cues", "is about a UI element ({terms})", _count(UI_ELEMENT)),
    ScopeFeature("query_cues", "is about a query or table ({terms})", _count(QUERY)),
    ScopeFeature("automation_cues", "is one piece of automation ({terms})", _count(AUTOMATION)),
    ScopeFeature("bugfix_cues", "is a bug fix ({terms})", _count(BUGFIX)),
    ScopeFeature("validation_cues", "adds validation or checks ({terms})", _count(VALIDATION)),
    ScopeFeature("testing_cues", "is about tests ({terms})", _count(TESTING)),
    ScopeFeature("docs_cues", "is about documentation ({terms})", _count(DOCS)),
    ScopeFeature("existing_component", "works inside something that exists ({terms})",
                 _count(EXISTING)),
    ScopeFeature("quantifier_all", "applies to all/every/whole ({terms})", _count(QUANTIFIER_ALL)),
    ScopeFeature("span_words", "spans several parts ({terms})", _count(SPAN_WORDS)),
    ScopeFeature("plural_systems", "talks about systems in the plural ({terms})",
                 _count(PLURAL_SYSTEMS)),
    ScopeFeature("with_clauses", "lists extra requirements ({terms})", _count(WITH_CLAUSE)),
    ScopeFeature("new_word", "asks for something new ({terms})", _count(NEW_WORD)),
    ScopeFeature("log_word_count", "is a long description ({terms})", _log_words),
    ScopeFeature("short_description", "is a short description ({terms})", _short),
    ScopeFeature("long_description", "is a long description ({terms})", _long),
    ScopeFeature("comma_count", "has a list of parts ({terms})", _char_count(",")),
    ScopeFeature("and_count", "joins several parts ({terms})", _and_count),
    ScopeFeature("listed_parts", "enumerates several parts of work ({terms})", _list_items),
    ScopeFeature("sentences", "has several sentences ({terms})", _sentences),
    ScopeFeature("numbers", "quotes numbers ({terms})", _numbers),
    ScopeFeature("version_number", "names a version or a dotted value ({terms})", _version),
    ScopeFeature("quoted_text", "quotes literal text ({terms})", _quoted),
    ScopeFeature("security_and_scale", "is security work at organisation scale ({terms})",
                 _both(_count(SECURITY), _count(SCALE_WORDS))),
    ScopeFeature("performance_at_scale", "is performance work at scale ({terms})",
                 _both(_count(PERFORMANCE), _count(SCALE_NUMBER))),
    ScopeFeature("says_nothing_else", "says the change is this one thing ({terms})",
                 _count(NOTHING_ELSE)),
    ScopeFeature("many_things", "covers many things of one kind ({terms})", _count(MANY_THINGS)),
    ScopeFeature("system_object", "works on a whole system or platform ({terms})",
                 _count(SYSTEM_OBJECT)),
    ScopeFeature("transformation", "turns one kind of system into another ({terms})",
                 _count(TRANSFORMATION)),
    ScopeFeature("create_verbs", "uses verbs of creation ({terms})", _count(CREATE_VERBS)),
    ScopeFeature("edit_verbs", "uses verbs of editing ({terms})", _count(EDIT_VERBS)),
    ScopeFeature("create_minus_edit", "creates more than it edits ({terms})", _create_minus_edit),
    ScopeFeature("list_items", "is a list of {value:.0f} items", _bullets),
)

SCOPE_FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in SCOPE_FEATURES)


def scope_features(text: str) -> tuple[np.ndarray, list[tuple[str, ...]]]:
    """Raw (unscaled) scope feature values and, per feature, the matched terms."""
    norm = normalise(text)
    doc = Doc(norm, _TOKEN.findall(norm), bullets=len(BULLET.findall(text)))
    values = np.empty(len(SCOPE_FEATURES), dtype=np.float64)
    terms: list[tuple[str, ...]] = []
    for i, feat in enumerate(SCOPE_FEATURES):
        v, t = feat.compute(doc)
        values[i] = v
        terms.append(t)
    return values, terms


# ---------------------------------------------------------------- the full vector

def _tfidf_into(vec: np.ndarray, offset: int, counts: dict[int, int], idf: np.ndarray,
                weight: float) -> None:
    """Sublinear TF x IDF, L2-normalised, times ``weight``, written at ``offset``."""
    if not counts:
        return
    idx_arr = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    tf = 1.0 + np.log(np.fromiter(counts.values(), dtype=np.float64, count=len(counts)))
    w = tf * idf[idx_arr]
    w *= weight / math.sqrt(float(np.dot(w, w)))
    vec[offset + idx_arr] = w


@dataclass
class Featurizer:
    """Word TF-IDF + character TF-IDF + scaled scope features, from training metadata.

    Layout: ``[word block | character block | scope block]``.
    """

    vocabulary: dict[str, int]
    idf: np.ndarray
    scope_mean: np.ndarray
    scope_scale: np.ndarray
    # Weight of the scope block relative to the unit-length word TF-IDF block.
    scope_weight: float
    char_vocabulary: dict[str, int] = field(default_factory=dict)
    char_idf: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # Length of the character block (the word block has length 1).
    char_weight: float = 0.0

    @property
    def n_terms(self) -> int:
        return len(self.vocabulary)

    @property
    def n_chars(self) -> int:
        return len(self.char_vocabulary)

    @property
    def scope_offset(self) -> int:
        return self.n_terms + self.n_chars

    @property
    def size(self) -> int:
        return self.scope_offset + len(SCOPE_FEATURES)

    def transform_one(self, text: str) -> tuple[np.ndarray, dict[int, str], list[tuple[str, ...]]]:
        """(vector, {tfidf index: surface n-gram}, matched terms per scope feature)."""
        return self.transform_full(text)[:3]

    def transform_full(self, text: str) -> tuple[np.ndarray, dict[int, str],
                                                 list[tuple[str, ...]], np.ndarray]:
        """``transform_one`` plus the raw (unscaled) scope values, for callers that
        need both (the planner) without computing the scope features twice.

        The surface map covers both TF-IDF blocks: a word n-gram maps to itself,
        a character n-gram (index past ``n_terms``) to the word it came from."""
        vec = np.zeros(self.size, dtype=np.float32)
        surface: dict[int, str] = {}
        counts: dict[int, int] = {}
        for gram, shown in ngrams(text):
            idx = self.vocabulary.get(gram)
            if idx is not None:
                counts[idx] = counts.get(idx, 0) + 1
                surface.setdefault(idx, shown)
        _tfidf_into(vec, 0, counts, self.idf, 1.0)
        if self.char_weight > 0.0:
            counts = {}
            for gram, word in char_ngrams(text):
                idx = self.char_vocabulary.get(gram)
                if idx is not None:
                    counts[idx] = counts.get(idx, 0) + 1
                    surface.setdefault(self.n_terms + idx, word)
            _tfidf_into(vec, self.n_terms, counts, self.char_idf, self.char_weight)
        raw, terms = scope_features(text)
        vec[self.scope_offset:] = self.scope_weight * (raw - self.scope_mean) / self.scope_scale
        return vec, surface, terms, raw

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.size), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i] = self.transform_one(text)[0]
        return out


def fit_vocabulary(texts: Iterable[str], min_df: int,
                   grams: Callable[[str], list[tuple[str, str]]] = ngrams
                   ) -> tuple[dict[str, int], np.ndarray]:
    """Vocabulary (n-grams in >= min_df documents) and smoothed IDF, as scikit-learn does.

    ``grams`` picks the block: ``ngrams`` (words) or ``char_ngrams``."""
    df: dict[str, int] = {}
    n_docs = 0
    for text in texts:
        n_docs += 1
        for gram in {g for g, _ in grams(text)}:
            df[gram] = df.get(gram, 0) + 1
    kept = sorted(g for g, n in df.items() if n >= min_df)
    vocab = {g: i for i, g in enumerate(kept)}
    idf = np.array([math.log((1 + n_docs) / (1 + df[g])) + 1.0 for g in kept], dtype=np.float64)
    return vocab, idf
