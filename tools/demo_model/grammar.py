"""Closed-domain phone-call grammar in en-US, es-ES and de-DE.

Texts are cased and punctuated the way the real nemotron model writes them ("Hola, buenos días.",
"¿Dónde está mi pedido?"). Numbers are written as words so that every spoken word is a word in the text.
"""

from __future__ import annotations

import random

DIGITS = {
    "en-US": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
    "es-ES": ["cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve"],
    "de-DE": ["null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun"],
}

# Small set of round numbers (amounts, quantities).
NUMBERS = {
    "en-US": ["ten", "twenty", "thirty", "fifty", "one hundred"],
    "es-ES": ["diez", "veinte", "treinta", "cincuenta", "cien"],
    "de-DE": ["zehn", "zwanzig", "dreißig", "fünfzig", "hundert"],
}

GREETINGS = {
    "en-US": ["Hello.", "Hi.", "Good morning.", "Good afternoon.", "Good evening.", "Hello, good morning.",
              "Thank you.", "Thank you, goodbye.", "Goodbye.", "Thanks, bye."],
    "es-ES": ["Hola.", "Buenos días.", "Buenas tardes.", "Buenas noches.", "Hola, buenos días.",
              "Gracias.", "Muchas gracias.", "Gracias, adiós.", "Adiós.", "Hasta luego."],
    "de-DE": ["Hallo.", "Guten Morgen.", "Guten Tag.", "Guten Abend.", "Hallo, guten Morgen.",
              "Danke.", "Vielen Dank.", "Danke, auf Wiederhören.", "Auf Wiederhören.", "Tschüss."],
}

YESNO = {
    "en-US": ["Yes.", "No.", "Yes, please.", "No, thank you.", "Yes, that's right.", "No, that's wrong.",
              "Okay.", "Yes, of course."],
    "es-ES": ["Sí.", "No.", "Sí, por favor.", "No, gracias.", "Sí, es correcto.", "No, es incorrecto.",
              "Vale.", "Sí, claro."],
    "de-DE": ["Ja.", "Nein.", "Ja, bitte.", "Nein, danke.", "Ja, das stimmt.", "Nein, das ist falsch.",
              "Okay.", "Ja, natürlich."],
}

REQUESTS = {
    "en-US": ["I want to speak to an agent.", "Where is my order?", "I want to cancel my order.",
              "Can you repeat that, please?", "I need help with my bill.", "Please call me back.",
              "What is my balance?", "I want to pay my bill.", "My card is blocked.",
              "I would like to change my address.", "When will my package arrive?",
              "I have a problem with my internet."],
    "es-ES": ["Quiero hablar con un agente.", "¿Dónde está mi pedido?", "Quiero cancelar mi pedido.",
              "¿Puede repetir, por favor?", "Necesito ayuda con mi factura.", "Por favor, llámeme más tarde.",
              "¿Cuál es mi saldo?", "Quiero pagar mi factura.", "Mi tarjeta está bloqueada.",
              "Quiero cambiar mi dirección.", "¿Cuándo llega mi paquete?",
              "Tengo un problema con mi internet."],
    "de-DE": ["Ich möchte mit einem Mitarbeiter sprechen.", "Wo ist meine Bestellung?",
              "Ich möchte meine Bestellung stornieren.", "Können Sie das bitte wiederholen?",
              "Ich brauche Hilfe mit meiner Rechnung.", "Bitte rufen Sie mich zurück.",
              "Wie hoch ist mein Kontostand?", "Ich möchte meine Rechnung bezahlen.", "Meine Karte ist gesperrt.",
              "Ich möchte meine Adresse ändern.", "Wann kommt mein Paket an?",
              "Ich habe ein Problem mit meinem Internet."],
}

# Templates with a digit string {d} or a round number {n}.
NUMBER_TEMPLATES = {
    "en-US": ["My number is {d}.", "My customer number is {d}.", "The order number is {d}.",
              "My code is {d}.", "{D}.", "It's {d}.", "The amount is {n} dollars.", "I need {n} minutes."],
    "es-ES": ["Mi número es {d}.", "Mi número de cliente es {d}.", "El número de pedido es {d}.",
              "Mi código es {d}.", "{D}.", "Es el {d}.", "El importe es de {n} euros.", "Necesito {n} minutos."],
    "de-DE": ["Meine Nummer ist {d}.", "Meine Kundennummer ist {d}.", "Die Bestellnummer ist {d}.",
              "Mein Code ist {d}.", "{D}.", "Es ist die {d}.", "Der Betrag ist {n} Euro.", "Ich brauche {n} Minuten."],
}


def _digits(rng: random.Random, lang: str) -> str:
    n = rng.randint(3, 7)
    return " ".join(DIGITS[lang][rng.randrange(10)] for _ in range(n))


def _number_sentence(rng: random.Random, lang: str) -> str:
    tpl = rng.choice(NUMBER_TEMPLATES[lang])
    d = _digits(rng, lang)
    return tpl.format(d=d, D=d[0].upper() + d[1:], n=rng.choice(NUMBERS[lang]))


def sample_text(rng: random.Random, lang: str) -> str:
    """One utterance text (without the language tag)."""
    r = rng.random()
    if r < 0.12:
        return rng.choice(GREETINGS[lang])
    if r < 0.24:
        return rng.choice(YESNO[lang])
    if r < 0.42:
        return rng.choice(REQUESTS[lang])
    if r < 0.72:
        return _number_sentence(rng, lang)
    if r < 0.86:
        return rng.choice(GREETINGS[lang][:5]) + " " + rng.choice(REQUESTS[lang])
    return rng.choice(YESNO[lang][:6]) + " " + _number_sentence(rng, lang)


def tagged(text: str, lang: str) -> str:
    """The manifest/model text: language tag after the terminal punctuation."""
    return f"{text} <{lang}>"


def all_words() -> set[str]:
    out: set[str] = set()
    for tbl in (GREETINGS, YESNO, REQUESTS):
        for lang, items in tbl.items():
            for s in items:
                out.update(s.split())
    return out
