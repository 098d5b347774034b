"""Training text for the synthetic models' byte-level BPE (see `ds4tp.synth`).

Written for this project: a mix of English and Italian prose, dialogue, numbers, markup and
code, so the merges cover the kinds of text the tests and the chat template feed the model.
Changing this text changes the tokenizer of every synthetic model (and the cached default).
"""

CORPUS = r'''
# Notes on a small weather station

The station sits on the roof of the old library, next to the water tank. It measures the
temperature, the humidity, the air pressure and the speed of the wind every ten seconds, and
it sends a summary to the server once a minute. When the network is down, the readings are
kept on a memory card and sent later, in the order they were taken.

Last winter the wind sensor froze twice. The first time, on the 12th of January, the readings
stayed at zero for almost three hours; the second time, on the 3rd of February, the sensor
reported a steady 214 km/h, which would have been a record for the whole region. Both events
are marked in the data as "sensor fault" and are ignored by the monthly averages.

## What we learned

1. Cheap sensors are fine, as long as you check them against each other.
2. Keep the raw data. Averages can always be computed again; raw readings cannot.
3. Write down every change to the hardware, with the date and the reason.
4. A station that nobody looks at is a station that slowly stops working.

The average temperature in July was 24.6 degrees, with a maximum of 38.1 on the 19th and a
minimum of 14.9 on the 2nd. It rained on 7 days, for a total of 41 mm. In August the numbers
were similar: 25.3 degrees on average, 6 rainy days, 53 mm of rain, mostly in one storm.

# Appunti di viaggio

Siamo partiti da Milano alle sette del mattino, con il treno regionale che si ferma in ogni
paese. Il cielo era grigio e basso, e la pianura sembrava non finire mai: campi di mais, file
di pioppi, qualche cascina con il tetto rosso e un cane che abbaiava al passaggio del treno.

A Verona abbiamo cambiato treno. La stazione era piena di studenti e di turisti con le valigie
grandi, e un signore anziano ci ha chiesto se sapevamo a che ora partiva il treno per Venezia.
Non lo sapevamo, ma abbiamo guardato insieme il tabellone, e poi lui ci ha raccontato di quando
lavorava nelle ferrovie, tanti anni fa, e i treni erano lenti ma arrivavano sempre.

Nel pomeriggio siamo arrivati al lago. L'acqua era ferma e chiara, le montagne si specchiavano
sulla superficie, e sulla riva c'erano barche di legno tirate in secco. Abbiamo mangiato pane,
formaggio e pomodori seduti su una panchina, e per un'ora nessuno ha detto niente.

La sera il paese si riempie di gente. Le finestre sono aperte, si sentono le voci delle
famiglie a cena, il rumore dei piatti, una radio che trasmette una partita di calcio. Domani
vorremmo salire fino al rifugio, se il tempo lo permette: sono quattro ore di cammino, e la
guida dice che il sentiero è facile, ma noi non ci crediamo del tutto.

"Quanto manca?" chiese la bambina.
"Poco," rispose il padre, "vedi quella chiesa sulla collina? Siamo quasi arrivati."
"Lo hai detto anche un'ora fa!"

# A short conversation

User: Can you explain what a hash table is, in simple words?
Assistant: A hash table stores values under keys. To find where a key goes, it runs the key
through a hash function, which turns it into a number, and uses that number to pick a slot.
Looking up a key is then fast, because you go straight to its slot instead of searching.

User: What happens when two keys land in the same slot?
Assistant: That is called a collision. One common fix is to keep a small list in each slot;
another is to try the next free slot. Either way, a good hash function keeps collisions rare.

User: Grazie! E in italiano come si dice?
Assistant: Si chiama "tabella hash". Le chiavi vengono trasformate in numeri da una funzione
di hash, e il numero indica la posizione in cui cercare o salvare il valore.

# Code

```python
import json
from dataclasses import dataclass


@dataclass
class Reading:
    station: str
    time: int          # seconds since the epoch
    temperature: float
    humidity: float


def parse_line(line: str) -> Reading:
    """Parse one CSV line: station,time,temperature,humidity."""
    station, time, temp, hum = line.strip().split(",")
    return Reading(station, int(time), float(temp), float(hum))


def daily_mean(readings: list[Reading]) -> dict[int, float]:
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for r in readings:
        day = r.time // 86400
        sums[day] = sums.get(day, 0.0) + r.temperature
        counts[day] = counts.get(day, 0) + 1
    return {day: sums[day] / counts[day] for day in sums}


if __name__ == "__main__":
    with open("readings.csv") as f:
        rows = [parse_line(line) for line in f if line.strip()]
    print(json.dumps(daily_mean(rows), indent=2))
```

```c
#include <stdio.h>
#include <stdlib.h>

/* Return the index of the largest value, or -1 for an empty array. */
static int argmax(const float *x, int n) {
    if (n <= 0) return -1;
    int best = 0;
    for (int i = 1; i < n; i++) {
        if (x[i] > x[best]) best = i;
    }
    return best;
}

int main(void) {
    float logits[5] = {0.5f, -1.25f, 3.0f, 2.75f, 0.0f};
    printf("argmax = %d\n", argmax(logits, 5));
    return 0;
}
```

```json
{"model": "tiny", "layers": 6, "vocab": 3072, "experts": {"routed": 16, "used": 6, "shared": 1},
 "messages": [{"role": "system", "content": "You are a helpful assistant."},
              {"role": "user", "content": "What is 17 * 23?"},
              {"role": "assistant", "content": "17 * 23 = 391."}]}
```

# Small facts and numbers

The speed of light is about 299,792 kilometres per second. A year has 365 days, or 366 in a
leap year; 2024 was a leap year, and 2028 will be the next one. Water boils at 100 degrees
Celsius at sea level, but at about 90 degrees at 3,000 metres. One kilobyte is 1024 bytes in
the old convention and 1000 bytes in the new one, which is why a 512 GB disk shows less space
than you expect. The list 3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5 holds the first digits of pi.

Il treno delle 18:45 per Bologna parte dal binario 7. Il biglietto costa 12,50 euro, ma con la
carta giovani si paga il 30% in meno. La distanza tra Roma e Napoli è di circa 225 chilometri;
in macchina ci vogliono due ore e mezza, in treno poco più di un'ora.

# Instructions for the lab

Before you start, read the whole procedure once. Wear gloves and glasses at all times, and
never work alone in the lab after six in the evening. Label every bottle with its content, the
date and your name. If you spill something, stop, tell the person in charge, and clean it up
following the sheet on the wall. At the end of the day, switch off the hot plates, close the
gas valves, and write in the log what you did, what went wrong and what is still running.

Prima di iniziare, leggete tutta la procedura. Indossate sempre guanti e occhiali, e non
lavorate mai da soli in laboratorio dopo le sei di sera. Scrivete su ogni bottiglia il
contenuto, la data e il vostro nome. Alla fine della giornata spegnete le piastre, chiudete il
gas e annotate nel registro quello che avete fatto e quello che è ancora acceso.

# Shell

    $ git status
    $ git add src/model.py tests/test_model.py
    $ git commit -m "model: fix the sign of the router bias"
    $ python -m pytest -q tests/ -k "router or expert"
    $ ls -la /var/log | grep -i error | head -n 20

<html><body><p class="note">Hello, <b>world</b>!</p><a href="https://example.org/a?b=1&c=2">link</a></body></html>

SELECT station, AVG(temperature) AS mean_t, COUNT(*) AS n
FROM readings WHERE time >= 1700000000 GROUP BY station ORDER BY mean_t DESC LIMIT 10;
'''
