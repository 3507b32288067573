// ESLint for the JupyterLab extension's TypeScript (`npm run lint:check`, run by dev/test
// and pre-commit). Type-aware typescript-eslint rules catch unhandled promises and unsafe
// `any`; eslint-config-prettier turns off the style rules that prettier owns.
import js from '@eslint/js';
import prettier from 'eslint-config-prettier';
import globals from 'globals';
import tseslint from 'typescript-eslint';

export default tseslint.config(
  { ignores: ['lib/', 'node_modules/'] },
  {
    files: ['src/**/*.{ts,tsx}'],
    extends: [js.configs.recommended, ...tseslint.configs.recommendedTypeChecked, prettier],
    languageOptions: {
      globals: globals.browser,
      parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname }
    },
    rules: {
      '@typescript-eslint/no-unused-vars': ['error', { args: 'none' }],
      // Lumino's `signal.connect(this._slot, this)` binds `this` itself
      '@typescript-eslint/unbound-method': 'off',
      eqeqeq: ['error', 'smart'],
      curly: ['error', 'all']
    }
  },
  {
    files: ['**/*.{js,mjs}'],
    extends: [js.configs.recommended, prettier],
    languageOptions: { globals: globals.node }
  }
);
