"""Pure: the new text of a reply (quotes, attributions, client and phone signatures left out) and whether it only
asks to unsubscribe.

mail-parser-reply (maintained, MIT) splits a reply at the attributions and header blocks of the common clients in
a dozen languages (Gmail's "On … wrote:" even wrapped over two lines, Outlook's underscores and From/Sent block,
Apple Mail, Thunderbird) and knows the usual closing lines. The rules here add what it leaves: phone and app
signatures in the languages it does not cover ("Von meinem iPhone gesendet", "Envoyé de mon iPhone"), attributions
it misses ("El … escribió:"), and a first block that is already quoted text (a reply with nothing new in it).

Its patterns backtrack on long lines, and a reply's text is the prospect's to write: only the start of the text is
read (`MAX_TEXT`), each line cut at `MAX_LINE`. An unsubscribe reply is a line or two; an attribution is shorter
than that line.
"""

from __future__ import annotations

import functools
import re

from mailparser_reply import EmailReplyParser

MAX_TEXT = 8192  # characters of a reply's text read at all
MAX_LINE = 300  # characters of one line (the reply parser's patterns cost the square of a line's length)
LANGUAGES = ("en", "de", "fr", "es", "it", "nl", "pl", "sv", "da", "cs")

# A reply that says only this (case, end punctuation and a "please" or "thanks" aside) asks to hear no more. Kept
# short on purpose: a sentence that merely contains "stop" is a reply, not an unsubscribe. README lists them.
UNSUBSCRIBE_WORDS = frozenset(
    {
        "unsubscribe",
        "unsubscribe me",
        "remove me",
        "remove",
        "stop",
        "opt out",
        "opt-out",
        "take me off your list",
        "abmelden",
        "austragen",
        "désabonner",
        "desabonner",
        "désinscrire",
        "desinscrire",
        "désinscription",
        "baja",
        "darse de baja",
        "descadastrar",
        "afmelden",
        "uitschrijven",
        "cancellami",
        "disiscrivimi",
        "avregistrera",
        "afmeld",
    }
)
_POLITE = re.compile(
    r"^(?:please|pls|bitte|merci|por favor|per favore|alstublieft|s'il vous plaît|s'il vous plait)[\s,]+|"
    r"[\s,]+(?:please|pls|thanks|thank you|thx|bitte|danke|merci|por favor|gracias|grazie|bedankt|obrigado)$"
)

# Where the new text ends: quoted text, an attribution, a separator, a forwarded or original message, a client's
# header block, a phone's or app's signature.
_CUT = re.compile(
    r"^(?:>"
    r"|-- ?$|_{5,}|-{5,}"
    r"|-+ ?(?:original message|ursprüngliche nachricht|message d'origine|mensaje original|messaggio originale"
    r"|oorspronkelijk bericht|mensagem original|forwarded message|weitergeleitete nachricht)"
    r"|(?:from|von|de|da|van|från|fra|od|sent|gesendet|envoyé|enviado|inviato|verzonden|date|datum):\s*\S.*"
    r"|sent from (?:my |mail |outlook|yahoo|gmail|proton|samsung)"
    r"|sent from .* for (?:ios|android)|get outlook for |holen sie sich outlook"
    r"|von meinem .* gesendet|gesendet von |gesendet mit "
    r"|envoy[ée] de mon |envoy[ée] depuis |envoy[ée] à partir de |obtenir outlook"
    r"|enviado desde |enviado do meu |enviado de meu |enviado a partir de "
    r"|inviato da |inviato dal mio "
    r"|verzonden (?:vanaf|met|van) |verstuurd vanaf "
    r"|skickat från |sendt fra |wysłano z |odesláno z "
    r"|(?:on|am|le|el|il|op|den|em|w dniu|dne) .{0,200}(?:wrote|schrieb|a écrit|escribió|ha scritto|schreef"
    r"|skrev|escreveu|napisał|napsal)\s?:)",
    re.IGNORECASE,
)
# The second line of an attribution wrapped by the client ("On Sat, Dec 5, 2026 at 6:57 AM Alice <a@b>\nwrote:").
_ATTRIBUTION_END = re.compile(
    r"^(?:.{0,200}\s)?(?:wrote|schrieb|a écrit|escribió|ha scritto|schreef|skrev|escreveu|napisał|napsal)\s?:$",
    re.IGNORECASE,
)
_ATTRIBUTION_START = re.compile(r"^(?:on|am|le|el|il|op|den|em|w dniu|dne)\s", re.IGNORECASE)


@functools.cache
def _parser() -> EmailReplyParser:
    return EmailReplyParser(languages=list(LANGUAGES))


def new_text(text: str) -> str:
    """What the sender wrote above everything quoted, attributed or signed by a client ("" when nothing)."""
    lines = [line[:MAX_LINE] for line in text[:MAX_TEXT].replace("\r\n", "\n").split("\n")]
    bounded = "\n".join(lines)
    replies = _parser().read(text=bounded).replies
    if not replies or replies[0].headers:
        return ""  # the text starts with an attribution or a header block: nothing new above it
    said: list[str] = []
    for raw in replies[0].body.split("\n"):
        line = raw.strip()
        if _CUT.match(line):
            break
        if _ATTRIBUTION_END.match(line):
            if said and _ATTRIBUTION_START.match(said[-1]):
                said.pop()
            break
        said.append(line)
    return "\n".join(said).strip()


def only_unsubscribe(text: str) -> bool:
    """Is the new text of this reply one unsubscribe phrase (on at most two lines), and nothing else?"""
    said = [line for line in new_text(text).split("\n") if line.strip()]
    if not said or len(said) > 2:
        return False
    words = " ".join(" ".join(said).lower().split()).strip(" .!,;:")
    for _ in range(2):  # "please unsubscribe me, thanks"
        words = _POLITE.sub("", words).strip(" .!,;:")
    return words in UNSUBSCRIBE_WORDS
