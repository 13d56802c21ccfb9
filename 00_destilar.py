"""Paso opcional (antes de 03): un modelo "profesor" escribe datos Alpaca por tema, ya revisados.

Por cada tema de --topics pide ensayos largos (≥ 150 palabras), respuestas cortas (≤ 40 palabras) y preguntas de
"errores típicos" (con la respuesta correcta y la equivocada, para el entrenamiento de preferencias). Solo se
conservan las entradas que pasan la misma revisión que 03 (formato, longitud de su clase, idioma, duplicados,
también frente a --against). Cada petición y su respuesta se guardan en --cache: si la ejecución se corta, el
mismo comando continúa sin volver a pagar lo ya recibido.

Uso:
    # Ollama (sin clave):
    python 00_destilar.py --topics temas.txt --teacher-url http://localhost:11434/v1 --teacher-model qwen2.5:7b
    # Gemini (clave en TEACHER_API_KEY o en los secretos de Colab):
    python 00_destilar.py --topics temas.txt --teacher-url https://generativelanguage.googleapis.com/v1beta/openai \\
        --teacher-model gemini-2.5-flash --price-per-mtok 0.30,2.50 --against tu_dataset.json
    # Sin red, con el modelo integrado (pequeño: sirve para probar el circuito, no para datos de calidad):
    python 00_destilar.py --topics temas.txt --teacher-model smollm2-135m --answers-per-topic 2

Después: python 03_train_model.py --dataset datos_destilados.json
"""

from afinar.core.errors import main_guard


@main_guard
def main(argv=None):
    from afinar.stages import distill_cli

    distill_cli.main(argv, __doc__)


if __name__ == "__main__":
    main()
